//! Text for people: what the CLI and the logs print of names and arguments that
//! came from users.

use std::borrow::Cow;

/// `s` for a terminal: control characters (which could move the cursor, retitle the
/// window or worse) escaped as Rust does (`\u{1b}`, `\n`); the rest as is.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// `s` cut to [`CLIP`] bytes for an error message (a huge argument is not echoed
/// back whole), with how long it was.
pub fn clip(s: &str) -> Cow<'_, str> {
    if s.len() <= CLIP {
        return Cow::Borrowed(s);
    }
    let mut end = CLIP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes)", &s[..end], s.len()))
}

/// The most bytes of a user's argument an error message repeats.
pub const CLIP: usize = 120;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_clipped() {
        assert_eq!(printable("plain name"), "plain name");
        assert_eq!(printable("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("c1\u{9b}x\n"), "c1\\u{9b}x\\n");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.len() < 200 && c.ends_with("(2000 bytes)"), "{c}");
        assert_eq!(clip("short"), "short");
    }
}
