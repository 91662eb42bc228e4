use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|p| p.name.as_str() == "mtlb-ebpf")
        .ok_or_else(|| anyhow!("mtlb-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?
        .as_str();
    aya_build::build_ebpf(
        [Package {
            name: "mtlb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
