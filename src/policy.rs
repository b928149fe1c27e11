//! Snapshot schedules and retention: `snapshot_every=15m` and
//! `keep=hourly:24+daily:7+weekly:4+monthly:12` (mount options or `STORE/snapfs.toml`).
//!
//! Retention is a grid, as sanoid and zrepl keep it: for each class, the newest
//! scheduled snapshot of each of the last N periods (UTC hours, days, ISO weeks,
//! months, years) is kept, and `last:N` keeps the newest N whatever their times; a
//! scheduled snapshot no class keeps is pruned. Snapshots
//! the user named (not `auto-…`) are never pruned.

use std::time::Duration;

/// Prefix of scheduled snapshots.
pub const AUTO_PREFIX: &str = "auto-";

/// How many periods of each class to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// The newest scheduled snapshots, whatever their times (`last:N`).
    pub last: u32,
    /// Hours.
    pub hourly: u32,
    /// Days.
    pub daily: u32,
    /// ISO weeks (Monday first).
    pub weekly: u32,
    /// Calendar months.
    pub monthly: u32,
    /// Calendar years.
    pub yearly: u32,
}

impl Keep {
    /// Parses `hourly:24+daily:7` (`+` or `,` between classes). At least one class
    /// must keep something: a policy that keeps nothing would prune every `auto-`
    /// snapshot, which an empty `keep=` never means.
    pub fn parse(spec: &str) -> Result<Keep, String> {
        let mut k = Keep::default();
        for part in spec.split(['+', ',']).filter(|p| !p.is_empty()) {
            let (class, n) = part
                .split_once(':')
                .ok_or_else(|| format!("keep: {part:?} is not CLASS:COUNT"))?;
            let n: u32 = n
                .parse()
                .map_err(|_| format!("keep: {n:?} is not a count"))?;
            match class {
                "last" => k.last = n,
                "hourly" => k.hourly = n,
                "daily" => k.daily = n,
                "weekly" => k.weekly = n,
                "monthly" => k.monthly = n,
                "yearly" => k.yearly = n,
                _ => {
                    return Err(format!(
                        "keep: unknown class {class:?} (last, hourly, daily, weekly, monthly, yearly)"
                    ));
                }
            }
        }
        if k == Keep::default() {
            let mut e = String::from("keep= needs at least one rule, e.g. hourly:24");
            if !spec.trim().is_empty() {
                e.push_str(&format!(" ({spec:?} keeps nothing)"));
            }
            return Err(e);
        }
        Ok(k)
    }
}

/// The longest schedule interval, in seconds (36500 days): far beyond any useful
/// schedule, and short enough that adding it to a clock reading never overflows.
const MAX_INTERVAL_SECS: u64 = 36_500 * 86_400;

/// Parses `90s`, `15m`, `1h`, `1d` (the unit is required), at most 36500 days.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            format!("{s:?} is too long an interval (at most 36500d)")
        } else {
            format!("{s:?} is not a duration like 15m")
        }
    })?;
    let unit_secs = match unit {
        "" => {
            return Err(format!(
                "{s:?} needs a unit: s, m, h or d (for example 15m)"
            ));
        }
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    // Checked: a wrapped product would be a short interval nobody asked for, and a
    // huge one would overflow the scheduler's clock arithmetic.
    let secs = n
        .checked_mul(unit_secs)
        .filter(|&secs| secs <= MAX_INTERVAL_SECS)
        .ok_or_else(|| format!("{s:?} is too long an interval (at most 36500d)"))?;
    if secs == 0 {
        return Err("a schedule interval must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A time as people read it: `2026-12-04 06:40:01 UTC`.
pub fn utc(sec: i64) -> String {
    auto_name(sec)
        .trim_start_matches(AUTO_PREFIX)
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// `auto-YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
pub fn auto_name(secs: i64) -> String {
    let (y, mo, d) = civil(secs.div_euclid(86400));
    let t = secs.rem_euclid(86400);
    format!(
        "{AUTO_PREFIX}{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Maps a Unix time to its period of one retention class.
type Bucket = fn(i64) -> i64;

/// Which scheduled snapshots `keep` prunes: `snaps` are (name, creation secs).
pub fn plan_prune(snaps: &[(String, i64)], keep: &Keep) -> Vec<String> {
    let mut auto: Vec<&(String, i64)> = snaps
        .iter()
        .filter(|(n, _)| n.starts_with(AUTO_PREFIX))
        .collect();
    auto.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let classes: [(u32, Bucket); 5] = [
        (keep.hourly, |t| t.div_euclid(3600)),
        (keep.daily, |t| t.div_euclid(86400)),
        // 1970-01-01 was a Thursday; shifting by 3 days starts weeks on Monday.
        (keep.weekly, |t| (t.div_euclid(86400) + 3).div_euclid(7)),
        (keep.monthly, |t| {
            let (y, m, _) = civil(t.div_euclid(86400));
            y * 12 + m as i64
        }),
        (keep.yearly, |t| civil(t.div_euclid(86400)).0),
    ];
    let mut kept = vec![false; auto.len()];
    // `last:N`: the newest N, whatever their periods.
    for k in kept.iter_mut().take(keep.last as usize) {
        *k = true;
    }
    for (count, bucket) in classes {
        let mut seen = 0u32;
        let mut last = None;
        for (i, (_, t)) in auto.iter().enumerate() {
            if seen >= count {
                break;
            }
            let b = bucket(*t);
            if last != Some(b) {
                kept[i] = true;
                seen += 1;
                last = Some(b);
            }
        }
    }
    auto.iter()
        .zip(kept)
        .filter(|(_, k)| !k)
        .map(|(s, _)| s.0.clone())
        .collect()
}

/// Reads `snapshot_every`, `keep`, `sync_to`, `sync_every` from `STORE/snapfs.toml`
/// (flat `key = "value"` lines; `#` comments). Missing file: no settings.
pub fn read_config(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("{}:{}: expected key = \"value\"", path.display(), n + 1))?;
        out.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
    }
    Ok(out)
}

/// Sets `key` to `value` in `STORE/snapfs.toml` (`None`: removes it), keeping every
/// other line; the file is replaced whole and durably (written aside, synced, renamed).
pub fn set_config(path: &std::path::Path, key: &str, value: Option<&str>) -> Result<(), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let is_key = |l: &str| {
        l.split('#')
            .next()
            .unwrap_or("")
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == key)
    };
    let mut out: String = text
        .lines()
        .filter(|l| !is_key(l))
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(v) = value {
        out.push_str(&format!("{key} = \"{v}\"\n"));
    }
    replace_file(path, out.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Replaces the file at `path` with `data`, durably and whole: written aside,
/// synced, renamed over it, its directory synced. A crash leaves the old file or the
/// new one, never a part.
pub fn replace_file(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(std::path::Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-10T12:00:00Z.
    const NOW: i64 = 1_768_046_400;

    #[test]
    fn names_carry_utc_time() {
        assert_eq!(auto_name(NOW), "auto-2026-01-10T12:00:00Z");
        assert_eq!(auto_name(0), "auto-1970-01-01T00:00:00Z");
    }

    #[test]
    fn forty_eight_hourly_snapshots_prune_exactly_to_the_grid() {
        // A controllable clock: 48 hourly snapshots ending at NOW, plus user-named ones.
        let mut snaps: Vec<(String, i64)> = (0..48)
            .map(|h| NOW - h * 3600)
            .map(|t| (auto_name(t), t))
            .collect();
        snaps.push(("before-upgrade".into(), NOW - 40 * 3600));
        snaps.push(("keepme".into(), NOW - 100 * 86400));
        let keep = Keep::parse("hourly:24+daily:7").unwrap();
        let pruned = plan_prune(&snaps, &keep);
        let kept: Vec<&String> = snaps
            .iter()
            .map(|s| &s.0)
            .filter(|n| !pruned.contains(n))
            .collect();
        // hourly:24 keeps the last 24 hours, 2026-01-09T13:00 .. 2026-01-10T12:00; daily:7
        // adds the newest of each earlier day present: 2026-01-08T23:00.
        let mut want: Vec<String> = (0..24).map(|h| auto_name(NOW - h * 3600)).collect();
        want.push("auto-2026-01-08T23:00:00Z".into());
        want.push("before-upgrade".into());
        want.push("keepme".into());
        let mut kept: Vec<String> = kept.into_iter().cloned().collect();
        kept.sort();
        want.sort();
        assert_eq!(kept, want);
        assert_eq!(pruned.len(), 48 - 25);
        assert!(pruned.iter().all(|n| n.starts_with(AUTO_PREFIX)));
    }

    #[test]
    fn weekly_and_monthly_buckets() {
        // Daily snapshots for 70 days; weekly:4 keeps 4 Sundays-or-latest; monthly:2 two months.
        let snaps: Vec<(String, i64)> = (0..70)
            .map(|d| NOW - d * 86400)
            .map(|t| (auto_name(t), t))
            .collect();
        let keep = Keep::parse("weekly:4+monthly:2").unwrap();
        let pruned = plan_prune(&snaps, &keep);
        let kept: Vec<&(String, i64)> = snaps.iter().filter(|s| !pruned.contains(&s.0)).collect();
        // The newest (Saturday 2026-01-10) covers this week and this month; 3 more weeks
        // end on Sundays; the newest of December 2025 is 2025-12-31.
        let names: Vec<&str> = kept.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "auto-2026-01-10T12:00:00Z",
                "auto-2026-01-04T12:00:00Z",
                "auto-2025-12-31T12:00:00Z",
                "auto-2025-12-28T12:00:00Z",
                "auto-2025-12-21T12:00:00Z",
            ]
        );
    }

    #[test]
    fn last_keeps_the_newest_whatever_their_times() {
        let snaps: Vec<(String, i64)> = (0..5)
            .map(|i| (auto_name(NOW + i), NOW + i))
            .chain([("mine".to_string(), NOW)])
            .collect();
        let keep = Keep::parse("last:2").unwrap();
        let pruned = plan_prune(&snaps, &keep);
        assert_eq!(
            pruned,
            [auto_name(NOW + 2), auto_name(NOW + 1), auto_name(NOW)]
        );
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(Keep::parse("hourly:x").unwrap_err().contains("not a count"));
        assert!(
            Keep::parse("minutely:3")
                .unwrap_err()
                .contains("unknown class")
        );
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert!(parse_duration("15q").is_err());
        assert!(parse_duration("5").is_err(), "a bare number has no unit");
    }

    #[test]
    fn a_keep_that_keeps_nothing_is_an_error() {
        // Each would otherwise prune every auto- snapshot.
        for spec in ["", "+", ",,", "hourly:0", "hourly:0+daily:0"] {
            let e = Keep::parse(spec).unwrap_err();
            assert!(e.contains("needs at least one rule"), "{spec:?}: {e}");
        }
        assert_eq!(
            Keep::parse("daily:0+weekly:2").unwrap(),
            Keep {
                weekly: 2,
                ..Keep::default()
            }
        );
    }

    #[test]
    fn a_duration_too_long_is_an_error() {
        let max = u64::MAX.to_string();
        // Each wraps, or overflows a clock reading plus the interval.
        for s in [
            format!("{max}m"),
            format!("{}d", u64::MAX / 86400 + 1),
            format!("{max}s"),
            "36501d".into(),
        ] {
            let e = parse_duration(&s).unwrap_err();
            assert!(e.contains("too long"), "{s}: {e}");
        }
        assert_eq!(
            parse_duration("36500d").unwrap(),
            Duration::from_secs(36_500 * 86_400)
        );
        // More digits than a u64 holds.
        let e = parse_duration(&format!("{}0s", u64::MAX)).unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }
}
