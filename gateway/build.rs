//! Link flags of the `meshup` binary (docs/scale.md, "An idle gateway").
//!
//! Both need the linker Rust uses on x86_64 Linux since 1.90, its own LLD (`rust-lld`),
//! and glibc ≥ 2.36 at run time (Debian 12's, which the image copies).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !linux_gnu {
        return;
    }
    // Relative relocations packed into a bitmap (DT_RELR): the position-independent binary
    // keeps its address randomisation, and the loader no longer reads 600 KiB of 24-byte
    // relocation records at start-up, all of which stayed resident.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // Release builds place the functions an idle gateway runs together at the start of the
    // code (the list: gateway/link-order.sh), so the kernel maps a few MiB of it instead of
    // two thirds. Names the binary lacks (a stale list) are skipped without a warning.
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        let order = std::path::Path::new(&dir).join("link-order.txt");
        println!("cargo:rerun-if-changed={}", order.display());
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
