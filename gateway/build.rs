//! Link flags of the `meshup` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu {
        // Relative relocations packed into a bitmap (DT_RELR; GNU ld ≥ 2.38, glibc ≥ 2.36,
        // the versions of Debian 12): the position-independent binary keeps its address
        // randomisation, and the loader no longer reads 600 KiB of 24-byte relocation
        // records at start-up, all of which stayed resident (docs/scale.md, "An idle
        // gateway").
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
