//! A stats-port flood, for tests that check it cannot starve the agent:
//! IDLE connections that send nothing and SLOW ones that send an endless
//! request head a little at a time, both reopened when the server closes
//! them, for SECONDS after the first round. Prints "ready" once the first
//! round is open, then a summary line at the end.
//!
//! usage: mtlb-test-flood ADDR IDLE SLOW SECONDS

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

struct Conn {
    slow: bool,
    s: Option<TcpStream>,
}

fn open(addr: SocketAddr, slow: bool) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    if slow {
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            .ok()?;
    }
    s.set_nonblocking(true).ok()?;
    Some(s)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [addr, idle, slow, secs] = &a[..] else {
        eprintln!("usage: mtlb-test-flood ADDR IDLE SLOW SECONDS");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let (idle, slow): (usize, usize) = (idle.parse().expect("IDLE"), slow.parse().expect("SLOW"));
    let secs = Duration::from_secs(secs.parse().expect("SECONDS"));
    let mut conns: Vec<Conn> = (0..idle + slow)
        .map(|i| Conn {
            slow: i >= idle,
            s: None,
        })
        .collect();
    let (mut opened, mut sent) = (0usize, 0usize);
    for c in &mut conns {
        c.s = open(addr, c.slow);
        opened += c.s.is_some() as usize;
    }
    println!("ready");
    // Counted from here: however long the first round took to open (connects
    // time out when the server falls behind), the flood lasts SECONDS.
    let end = Instant::now() + secs;
    let pad = [b'a'; 512];
    while Instant::now() < end {
        for c in &mut conns {
            match &mut c.s {
                Some(s) => {
                    let mut b = [0u8; 1];
                    // Closed by the server: reopen (bounded by time).
                    if matches!(s.peek(&mut b), Ok(0)) {
                        c.s = None;
                    } else if c.slow {
                        match s.write(&pad) {
                            Ok(n) => sent += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => c.s = None,
                        }
                    }
                }
                None => {
                    if Instant::now() < end {
                        c.s = open(addr, c.slow);
                        opened += c.s.is_some() as usize;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("opened {opened} sent {sent}");
}
