//! Error reporting. Library errors are `thiserror` types whose message
//! says what failed and whose `source` says why; each cause is printed once,
//! by walking the chain here (the binary's `anyhow` does the same with
//! `{:#}`).

/// `error: cause: cause…` on one line.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {0}")]
    struct Open(&'static str, #[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let e = Open("/x", std::io::Error::from_raw_os_error(2));
        assert_eq!(
            report(&e),
            "cannot open /x: No such file or directory (os error 2)"
        );
    }
}
