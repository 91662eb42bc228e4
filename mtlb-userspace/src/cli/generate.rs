//! `mtlb generate` (hidden): the man pages and shell completions, made
//! from the clap definitions so they never drift from `--help`. The
//! release build runs it for the Debian package (`cargo xtask deb`).

use anyhow::Context as _;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// mtlb.8 and one mtlb-<command>.8 per command into DIR.
    Man { dir: PathBuf },
    /// Completions for bash (mtlb), zsh (_mtlb) and fish (mtlb.fish) into
    /// DIR.
    Completions { dir: PathBuf },
}

/// Section 8: the binary is an administrator's command (/usr/sbin).
const MAN_SECTION: &str = "8";

/// `cli`: the whole command line, as clap describes it.
pub fn run(a: GenerateArgs, cli: clap::Command) -> anyhow::Result<()> {
    let (What::Man { dir } | What::Completions { dir }) = &a.what;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match &a.what {
        What::Man { dir } => man(dir, cli),
        What::Completions { dir } => completions(dir, cli),
    }
}

fn man(dir: &Path, cli: clap::Command) -> anyhow::Result<()> {
    // build() names each subcommand `mtlb-<name>`, the page's title.
    let mut cmd = cli.disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in pages {
        let man = clap_mangen::Man::new(page).section(MAN_SECTION);
        let path = man
            .generate_to(dir)
            .with_context(|| format!("writing a man page into {}", dir.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn completions(dir: &Path, mut cli: clap::Command) -> anyhow::Result<()> {
    use clap_complete::Shell;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cli, "mtlb", dir)
            .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
