use which::which;

/// Rebuilds the eBPF object when bpf-linker changes: cargo does not track
/// the linker binary itself.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found in PATH; run `cargo xtask run` or `cargo xtask test`, which install it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
