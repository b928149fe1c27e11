//! Compiles the CSI protobuf definition (for `snapfs csi`) with a pure-Rust protobuf
//! compiler, so no system `protoc` is needed. The definition is not kept in this
//! repository: it is read from `SNAPFS_CSI_PROTO`, or from the third-party tree beside
//! the project (`../shared/third_party/csi-spec-v1.9.0/csi.proto`). Without it snapfs
//! is built without its CSI driver, and `snapfs csi` says so.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(snapfs_csi)");
    println!("cargo::rerun-if-env-changed=SNAPFS_CSI_PROTO");
    let proto = match std::env::var_os("SNAPFS_CSI_PROTO") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
            .join("../shared/third_party/csi-spec-v1.9.0/csi.proto"),
    };
    println!("cargo::rerun-if-changed={}", proto.display());
    if !proto.is_file() {
        println!(
            "cargo::warning=no CSI definition at {} (set SNAPFS_CSI_PROTO): building without `snapfs csi`",
            proto.display()
        );
        return;
    }
    let dir = proto.parent().unwrap();
    let fds = protox::compile([&proto], [dir]).unwrap_or_else(|e| {
        panic!("{}: {e}", proto.display());
    });
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("{}: {e}", proto.display()));
    println!("cargo::rustc-cfg=snapfs_csi");
}
