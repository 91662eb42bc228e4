//! A replica process for tests that signal it (SIGKILL, SIGSTOP): listens on
//! ADDR, greets each connection with NAME and a newline, echoes what it
//! receives, closes when the client does. Prints "listening" once it
//! listens.
//!
//! usage: mtlb-test-replica NAME ADDR [BACKLOG] [v6only|dual] [ACCEPTS_PER_SEC]
//! (a rate makes a busy replica: it accepts no faster than that).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
};

fn main() {
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
