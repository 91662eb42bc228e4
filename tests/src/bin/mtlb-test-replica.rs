//! A replica process for tests that signal it (SIGKILL, SIGSTOP): listens on
//! ADDR, greets each connection with NAME and a newline, echoes what it
//! receives, closes when the client does. Prints "listening" once it
//! listens.
//!
//! usage: mtlb-test-replica NAME ADDR [BACKLOG] [v6only|dual] [ACCEPTS_PER_SEC]
//! (a rate makes a busy replica: it accepts no faster than that).
//!
//! `MTLB_TEST_ON_TERM` says what SIGTERM does (default: the process dies):
//! * `linger:MS`: shut down as the official MTProxy server does: keep the
//!   listener open MS milliseconds, close what it accepts in that time
//!   unanswered, then exit;
//! * `ignore`: a handler that does nothing (the process keeps serving).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    sync::atomic::{AtomicBool, Ordering},
};

/// Set once SIGTERM arrived under `linger`.
static CLOSING: AtomicBool = AtomicBool::new(false);

/// Installs what `MTLB_TEST_ON_TERM` asks for: SIGTERM blocked in every
/// thread and taken by one that waits for it.
fn on_term() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let Ok(how) = std::env::var("MTLB_TEST_ON_TERM") else {
        return;
    };
    let linger = match how.as_str() {
        "ignore" => None,
        h => Some(std::time::Duration::from_millis(
            h.strip_prefix("linger:")
                .and_then(|ms| ms.parse().ok())
                .expect("MTLB_TEST_ON_TERM: linger:MS or ignore"),
        )),
    };
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    // Before any other thread exists: they inherit the mask.
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).expect("sigmask");
    std::thread::spawn(move || {
        loop {
            if set.wait().is_err() {
                continue;
            }
            if let Some(d) = linger {
                CLOSING.store(true, Ordering::SeqCst);
                std::thread::sleep(d);
                std::process::exit(0);
            }
        }
    });
}

fn main() {
    on_term();
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(addr)) = (args.next(), args.next()) else {
        eprintln!("usage: mtlb-test-replica NAME ADDR [BACKLOG] [v6only|dual] [ACCEPTS_PER_SEC]");
        std::process::exit(2);
    };
    let backlog: i32 = args.next().map_or(1024, |b| b.parse().expect("BACKLOG"));
    let v6only = args.next().is_some_and(|a| a == "v6only");
    let rate: u32 = args
        .next()
        .map_or(0, |r| r.parse().expect("ACCEPTS_PER_SEC"));
    let pause = (rate > 0).then(|| std::time::Duration::from_secs(1) / rate);
    let addr: std::net::SocketAddr = addr.parse().expect("ADDR");
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    if addr.is_ipv6() {
        sock.set_only_v6(v6only).expect("IPV6_V6ONLY");
    }
    if let Err(e) = sock.bind(&addr.into()) {
        println!("bind failed: {e}");
        std::process::exit(3);
    }
    sock.listen(backlog).expect("listen");
    let l: TcpListener = sock.into();
    println!("listening");
    let greeting = format!("{name}\n");
    for s in l.incoming() {
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
        let Ok(mut s) = s else { continue };
        if CLOSING.load(Ordering::SeqCst) {
            // Shutting down: closed unanswered.
            drop(s);
            continue;
        }
        let g = greeting.clone();
        std::thread::spawn(move || {
            if s.write_all(g.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
