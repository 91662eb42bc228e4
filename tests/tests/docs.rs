//! The project's markdown links resolve: every relative link in README.md,
//! CONTRIBUTING.md, BENCHMARKS.md and docs/**/*.md names a file that exists,
//! and a `#fragment` into a markdown file names one of its headings, with
//! the anchors GitHub makes from headings. Not privileged: it only reads
//! files.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

/// The anchor GitHub gives a heading: its text lowercased, punctuation
/// other than `-` and `_` dropped, each space a `-`.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Link and image targets of a markdown text, and the anchors of its
/// headings (a repeated heading gets `-1`, `-2`, … as on GitHub).
fn parse(text: &str) -> (Vec<String>, HashSet<String>) {
    let mut targets = Vec::new();
    let mut anchors = HashSet::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut heading: Option<String> = None;
    for event in Parser::new_ext(text, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                targets.push(dest_url.to_string())
            }
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_default();
                anchors.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            _ => {}
        }
    }
    (targets, anchors)
}

/// A scheme (`https:`, `mailto:`, `tg:`) before any `/`: not a file here.
fn is_external(target: &str) -> bool {
    target
        .split_once(':')
        .is_some_and(|(scheme, _)| !scheme.is_empty() && !scheme.contains(['/', '#']))
}

/// Every broken relative link in `files`, as `file: target (why)`;
/// `root` is where a link starting with `/` is resolved from.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut broken = Vec::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (targets, _) = parse(&text);
        for target in targets.iter().filter(|t| !is_external(t)) {
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let resolved = match path {
                "" => file.clone(),
                p if p.starts_with('/') => root.join(p.trim_start_matches('/')),
                p => file.parent().unwrap_or(root).join(p),
            };
            let shown = file.strip_prefix(root).unwrap_or(file).display();
            if !resolved.exists() {
                broken.push(format!("{shown}: {target} (no such file)"));
                continue;
            }
            if fragment.is_empty() || resolved.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let (_, anchors) = parse(&fs::read_to_string(&resolved).unwrap_or_default());
            if !anchors.contains(fragment) {
                broken.push(format!("{shown}: {target} (no heading with that anchor)"));
            }
        }
    }
    broken
}

fn markdown_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            markdown_under(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

#[test]
fn docs_relative_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files: Vec<PathBuf> = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    markdown_under(&root.join("docs"), &mut files);
    assert!(files.len() > 3, "no markdown found under docs/");
    let broken = broken_links(root, &files);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The check itself: it reports a missing file and a missing anchor, and
/// accepts GitHub's anchors for headings with code, punctuation and
/// repeats.
#[test]
fn docs_link_check_finds_broken_links() {
    assert_eq!(slug("Health checks (`[check]`)"), "health-checks-check");
    assert_eq!(
        slug("cargo xtask vm-deploy: the deployment run for real"),
        "cargo-xtask-vm-deploy-the-deployment-run-for-real"
    );
    let dir = std::env::temp_dir().join(format!("mtlb-docs-links-{}", std::process::id()));
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(
        dir.join("sub/b.md"),
        "# B\n\n## `mtlb status`\n\n## Same\n\n## Same\n",
    )
    .unwrap();
    let a = dir.join("a.md");
    fs::write(
        &a,
        "# A\n\n[ok](sub/b.md#mtlb-status) [ok](sub/b.md#same-1) [ok](#a) \
         [ok](https://example.org/x.md) [ok](mailto:x@example.org)\n\n\
         [gone](sub/missing.md) [bad](sub/b.md#nothing) [bad](#nowhere)\n\n\
         ```\n[in code](not-a-link.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&dir, std::slice::from_ref(&a));
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        broken,
        [
            "a.md: sub/missing.md (no such file)",
            "a.md: sub/b.md#nothing (no heading with that anchor)",
            "a.md: #nowhere (no heading with that anchor)",
        ]
    );
}
