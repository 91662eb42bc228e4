//! Holds N connections to a unix stream socket, each having sent TEXT
//! once: prints the count after each thousand, then "held N" (or why it
//! stopped early), holds them until its stdin closes, and prints what the
//! first and the last connection were told ("first: LINE", "last: LINE").
//! It exits by itself after five minutes.
//!
//! usage: mtlb-test-hold SOCKET N TEXT

use std::{io::Read as _, io::Write as _, path::Path, time::Duration};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [socket, n, text] = &a[..] else {
        eprintln!("usage: mtlb-test-hold SOCKET N TEXT");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        std::process::exit(1);
    });
    // Every file this process may open.
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut nofile = getrlimit(Resource::Nofile);
    nofile.current = nofile.maximum;
    setrlimit(Resource::Nofile, nofile).expect("raising the open-file limit");
    let mut out = std::io::stdout();
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        match mtlb_tests::dial_control(Path::new(socket))
            .and_then(|mut s| s.write_all(text.as_bytes()).map(|()| s))
        {
            Ok(s) => held.push(s),
            Err(e) => {
                writeln!(out, "stopped after {}: {e}", held.len()).unwrap();
                break;
            }
        }
        if held.len() % 1000 == 0 {
            writeln!(out, "{}", held.len()).unwrap();
        }
    }
    if held.len() == n {
        writeln!(out, "held {n}").unwrap();
    }
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for (which, s) in [("first", held.first()), ("last", held.last())] {
        let told = s.map_or(Err("none held".into()), |s| {
            mtlb_tests::read_line_within(s, mtlb_tests::wait_limit())
        });
        writeln!(out, "{which}: {}", told.unwrap_or_else(|e| e).trim_end()).unwrap();
    }
}
