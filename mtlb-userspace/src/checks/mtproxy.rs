//! The `mtproxy` health check: proves that a replica speaks MTProxy with
//! the configured secret, and that its upstream answers.
//!
//! * `dd` (and plain) secrets: an obfuscated2 handshake with the padded
//!   intermediate tag, followed by one frame carrying an unencrypted
//!   `req_pq_multi`. A frame that comes back and decrypts, with the key
//!   derived from the secret, to that message (a relay echoing it) or to a
//!   `resPQ` with our nonce (a real Telegram DC) proves the secret and the
//!   whole path. Anything else that comes back cannot be decrypted with our
//!   key: wrong secret, or not MTProxy.
//! * `ee` secrets (fake TLS): a ClientHello whose random is the HMAC of the
//!   secret; every MTProxy implementation answers with ServerHello, CCS and
//!   application data before contacting Telegram, with a server random that
//!   is an HMAC of the secret too, so it is verified first. The same
//!   obfuscated2 frame then goes inside TLS records.
//!
//! Protocol: header bytes 0..56 are sent in clear, 56..64 encrypted; keys are
//! SHA-256(key material ‖ secret) and the stream is AES-256-CTR. The DC id is
//! 2 (an id outside 1..=5 is closed at once, like an unreachable upstream),
//! and each probe uses a fresh random header (proxies reject a replayed one).
//!
//! Verdicts, from measurements against mtprotoproxy 1.0.6
//! (tests/fixtures/mtproxy/FINDINGS.md) and the official C server
//! (tests/tests/official_mtproxy.rs; it is silent both on a wrong `dd`
//! secret and when it has no ready middle proxy, which the replica's stats
//! then tell apart: see `explain_silence` in checks/mod.rs):
//!
//! | the probe sees | dd | ee |
//! | --- | --- | --- |
//! | a frame answering our request | UP | UP (after a valid HMAC) |
//! | our own bytes back | wrong secret or not MTProxy | same |
//! | other bytes (a mask host, not MTProxy) | wrong secret or not MTProxy | same, or TLS reply HMAC mismatch |
//! | silence, or a close with nothing | no answer through proxy: a wrong secret cannot be told from an unreachable upstream, both servers stay silent or close | wrong secret or not MTProxy (no TLS answer) |
//! | valid HMAC, then silence or a close | (n/a) | no answer through proxy (secret verified, upstream unreachable) |

use super::{health::CheckResult, reason, tcp::connect};
use aes::cipher::{KeyIvInit as _, StreamCipher as _};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

type Ctr = ctr::Ctr128BE<aes::Aes256>;

const TAG_PADDED: [u8; 4] = [0xdd; 4];
const REQ_PQ_MULTI: u32 = 0xbe7e8ef1;
const RES_PQ: u32 = 0x05162463;
/// DC the probe asks for. Any configured DC works; 2 exists everywhere.
const DC: i16 = 2;
/// Longest frame that can answer our request: its echo is 40 bytes plus
/// up to 15 of padding, a DC's resPQ about 100. A longer length decrypted
/// from a reply means the reply is not under our key; waiting for that
/// many bytes would turn "not MTProxy" into a timeout (a plain server's
/// banner decrypts to a random length, plausible below 2^24 about once in
/// 128 probes).
const MAX_REPLY: usize = 4096;

/// A parsed MTProxy secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// Plain or `dd`: obfuscated2.
    Obfuscated([u8; 16]),
    /// `ee`: fake TLS with this SNI domain.
    FakeTls([u8; 16], String),
}

impl Secret {
    pub fn parse(s: &str) -> Option<Self> {
        let hex = |h: &str| -> Option<Vec<u8>> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect()
        };
        let key = |h: &str| -> Option<[u8; 16]> { hex(h)?.try_into().ok() };
        match s.len() {
            32 => Some(Self::Obfuscated(key(s)?)),
            34 if s[..2].eq_ignore_ascii_case("dd") => Some(Self::Obfuscated(key(&s[2..])?)),
            n if n > 34 && s[..2].eq_ignore_ascii_case("ee") => Some(Self::FakeTls(
                key(&s[2..34])?,
                String::from_utf8(hex(&s[34..])?).ok()?,
            )),
            _ => None,
        }
    }
}

/// Runs the check against `addr` within `timeout`.
pub async fn check(addr: SocketAddr, secret: &str, timeout: Duration) -> CheckResult {
    let t0 = Instant::now();
    let Some(secret) = Secret::parse(secret) else {
        // Validated with the config; kept as a result rather than a panic.
        return CheckResult::fail(
            reason::WRONG_SECRET,
            Some("unparsable secret".into()),
            t0.elapsed(),
        );
    };
    let mut s = match connect(addr, timeout).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let rest = timeout.saturating_sub(t0.elapsed());
    // Set once the fake-TLS answer proved the secret, so that silence is
    // judged by how far the probe got.
    let proven = AtomicBool::new(false);
    let verdict = match tokio::time::timeout(rest, probe(&mut s, &secret, &proven)).await {
        Ok(v) => v,
        Err(_) if proven.load(Ordering::Relaxed) => Verdict::SilentAfterTls,
        Err(_) if matches!(secret, Secret::FakeTls(..)) => {
            Verdict::NoServerHello(format!("no TLS answer within {}ms", timeout.as_millis()))
        }
        Err(_) => Verdict::Silent,
    };
    let d = t0.elapsed();
    match verdict {
        Verdict::Answered(how) => CheckResult {
            info: Some(how.into()),
            ..CheckResult::pass(reason::MTPROXY_OK, d)
        },
        Verdict::Garbage(why) => CheckResult::fail(reason::WRONG_SECRET, Some(why), d),
        Verdict::Echo => CheckResult::fail(
            reason::WRONG_SECRET,
            Some("our own bytes came back: not MTProxy".into()),
            d,
        ),
        Verdict::NoServerHello(why) => CheckResult::fail(reason::WRONG_SECRET, Some(why), d),
        Verdict::BadHmac => CheckResult::fail(
            reason::TLS_HMAC,
            Some("the TLS answer is not signed with our secret".into()),
            d,
        ),
        Verdict::ClosedAfterHandshake => CheckResult::fail(
            reason::NO_ANSWER,
            Some("closed without answering: upstream unreachable, or wrong secret".into()),
            d,
        ),
        Verdict::ClosedAfterTls => CheckResult::fail(
            reason::NO_ANSWER,
            Some(
                "secret verified by the TLS answer; closed without answering: upstream unreachable"
                    .into(),
            ),
            d,
        ),
        Verdict::Silent => CheckResult::fail(
            reason::NO_ANSWER,
            Some(format!(
                "no reply within {}ms: wrong secret, or upstream unreachable",
                timeout.as_millis()
            )),
            d,
        ),
        Verdict::SilentAfterTls => CheckResult::fail(
            reason::NO_ANSWER,
            Some(format!(
                "secret verified by the TLS answer; no reply within {}ms: upstream unreachable or slow",
                timeout.as_millis()
            )),
            d,
        ),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A frame came back that decrypts to our request ("echo") or to a resPQ.
    Answered(&'static str),
    /// Bytes came back that do not decrypt with our key.
    Garbage(String),
    /// Our own bytes came back unchanged (a plain echo server).
    Echo,
    /// ee: no fake-TLS answer at all.
    NoServerHello(String),
    /// ee: a TLS answer whose random is not our secret's HMAC.
    BadHmac,
    /// Closed with nothing sent after the handshake.
    ClosedAfterHandshake,
    /// ee: closed after a verified TLS answer (the secret is right).
    ClosedAfterTls,
    /// Nothing within the timeout.
    Silent,
    /// ee: nothing after a verified TLS answer.
    SilentAfterTls,
}

async fn probe(s: &mut TcpStream, secret: &Secret, proven: &AtomicBool) -> Verdict {
    match secret {
        Secret::Obfuscated(key) => {
            let (wire, mut enc, dec) = handshake(key);
            let (msg, nonce) = req_pq_multi();
            let mut frame = padded_frame(&msg);
            enc.apply_keystream(&mut frame);
            let mut sent = wire.to_vec();
            sent.extend_from_slice(&frame);
            if s.write_all(&sent).await.is_err() {
                return Verdict::ClosedAfterHandshake;
            }
            read_frame(s, dec, &msg, &nonce, Some(&sent), false).await
        }
        Secret::FakeTls(key, domain) => {
            let hello = client_hello(key, domain);
            if s.write_all(&hello).await.is_err() {
                return Verdict::NoServerHello("connection reset".into());
            }
            let reply = match read_server_hello(s).await {
                Ok(r) => r,
                Err(v) => return v,
            };
            if reply.starts_with(&hello[..16]) {
                return Verdict::Echo;
            }
            if !server_hello_signed(key, &hello[11..43], &reply) {
                return Verdict::BadHmac;
            }
            proven.store(true, Ordering::Relaxed);
            let (wire, mut enc, dec) = handshake(key);
            let (msg, nonce) = req_pq_multi();
            let mut frame = padded_frame(&msg);
            enc.apply_keystream(&mut frame);
            let mut payload = wire.to_vec();
            payload.extend_from_slice(&frame);
            let mut out = tls_record(0x14, &[1]);
            out.extend(tls_record(0x17, &payload));
            if s.write_all(&out).await.is_err() {
                return Verdict::ClosedAfterTls;
            }
            match read_frame(s, dec, &msg, &nonce, None, true).await {
                Verdict::ClosedAfterHandshake => Verdict::ClosedAfterTls,
                v => v,
            }
        }
    }
}

/// A 64-byte obfuscated2 header for the padded intermediate protocol, as
/// sent (0..56 clear, 56..64 encrypted), with the two ciphers.
fn handshake(secret: &[u8; 16]) -> ([u8; 64], Ctr, Ctr) {
    let mut h: [u8; 64];
    loop {
        h = rand::random();
        let bad_start = [
            *b"HEAD",
            *b"POST",
            *b"GET ",
            *b"OPTI",
            [0xee; 4],
            [0xdd; 4],
            [0x16, 0x03, 0x01, 0x02],
        ]
        .contains(&[h[0], h[1], h[2], h[3]]);
        if h[0] != 0xef && !bad_start && h[4..8] != [0; 4] {
            break;
        }
    }
    h[56..60].copy_from_slice(&TAG_PADDED);
    h[60..62].copy_from_slice(&DC.to_le_bytes());
    let (mut enc, dec) = ciphers(&h, secret);
    let mut encrypted = h;
    enc.apply_keystream(&mut encrypted);
    let mut wire = h;
    wire[56..].copy_from_slice(&encrypted[56..]);
    (wire, enc, dec)
}

/// Client-to-proxy and proxy-to-client ciphers of a header.
fn ciphers(h: &[u8; 64], secret: &[u8; 16]) -> (Ctr, Ctr) {
    let key = |material: &[u8]| -> [u8; 32] {
        let mut d = Sha256::new();
        d.update(material);
        d.update(secret);
        d.finalize().into()
    };
    let fwd = &h[8..56];
    let mut rev = [0u8; 48];
    rev.copy_from_slice(fwd);
    rev.reverse();
    let enc = Ctr::new(&key(&fwd[..32]).into(), fwd[32..48].into());
    let dec = Ctr::new(&key(&rev[..32]).into(), rev[32..48].into());
    (enc, dec)
}

/// An unencrypted MTProto `req_pq_multi` message and its nonce.
fn req_pq_multi() -> (Vec<u8>, [u8; 16]) {
    let nonce: [u8; 16] = rand::random();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // msg_id ~ unix time * 2^32, divisible by 4 as a client's must be.
    let msg_id = ((now.as_secs() << 32) | (now.subsec_nanos() as u64)) & !3;
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&msg_id.to_le_bytes());
    m.extend_from_slice(&20u32.to_le_bytes());
    m.extend_from_slice(&REQ_PQ_MULTI.to_le_bytes());
    m.extend_from_slice(&nonce);
    (m, nonce)
}

/// Padded intermediate framing: LE length (payload + padding), payload,
/// 0..15 random bytes.
fn padded_frame(payload: &[u8]) -> Vec<u8> {
    let pad = (rand::random::<u8>() % 16) as usize;
    let mut f = Vec::with_capacity(4 + payload.len() + pad);
    f.extend_from_slice(&((payload.len() + pad) as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f.extend((0..pad).map(|_| rand::random::<u8>()));
    f
}

/// Reads one frame and judges it. `sent`: for dd, what we sent (to spot a
/// plain echo server). `tls`: the stream is wrapped in TLS records.
async fn read_frame(
    s: &mut TcpStream,
    mut dec: Ctr,
    msg: &[u8],
    nonce: &[u8; 16],
    sent: Option<&[u8]>,
    tls: bool,
) -> Verdict {
    let mut raw = Vec::new();
    let mut plain = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) if raw.is_empty() => return Verdict::ClosedAfterHandshake,
            Ok(0) | Err(_) => {
                return Verdict::Garbage(format!(
                    "closed after {} bytes that are not a frame",
                    raw.len()
                ));
            }
            Ok(n) => n,
        };
        raw.extend_from_slice(&buf[..n]);
        if let Some(sent) = sent
            && raw.len() >= 16
            && sent.starts_with(&raw[..raw.len().min(sent.len())])
        {
            return Verdict::Echo;
        }
        let inner = if tls {
            match app_data(&raw) {
                Ok(i) => i,
                Err(e) => return Verdict::Garbage(e.to_string()),
            }
        } else {
            raw.clone()
        };
        if inner.len() > plain.len() {
            let mut more = inner[plain.len()..].to_vec();
            dec.apply_keystream(&mut more);
            plain.extend(more);
        }
        if plain.len() < 4 {
            continue;
        }
        let len = (u32::from_le_bytes(plain[..4].try_into().unwrap()) & 0x7fff_ffff) as usize;
        if !(8..=MAX_REPLY).contains(&len) {
            return Verdict::Garbage(format!("reply does not decrypt (frame length {len})"));
        }
        if plain.len() < 4 + len {
            continue;
        }
        let p = &plain[4..4 + len];
        if p.len() >= msg.len() && &p[..msg.len()] == msg {
            return Verdict::Answered("request echoed through the proxy");
        }
        if p.len() >= 40
            && p[..8] == [0; 8]
            && u32::from_le_bytes(p[20..24].try_into().unwrap()) == RES_PQ
            && p[24..40] == nonce[..]
        {
            return Verdict::Answered("resPQ through the proxy");
        }
        return Verdict::Garbage("reply frame does not answer our request".into());
    }
}

/// A reply that is not a stream of TLS records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a TLS record (type {0:#04x})")]
struct NotTls(u8);

/// Concatenated payloads of complete TLS application-data records.
fn app_data(raw: &[u8]) -> Result<Vec<u8>, NotTls> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= raw.len() {
        let t = raw[i];
        let len = u16::from_be_bytes([raw[i + 3], raw[i + 4]]) as usize;
        if !(t == 0x14 || t == 0x17) || raw[i + 1..i + 3] != [3, 3] {
            return Err(NotTls(t));
        }
        if i + 5 + len > raw.len() {
            break;
        }
        if t == 0x17 {
            out.extend_from_slice(&raw[i + 5..i + 5 + len]);
        }
        i += 5 + len;
    }
    Ok(out)
}

fn tls_record(t: u8, data: &[u8]) -> Vec<u8> {
    let mut r = vec![t, 3, 3];
    r.extend_from_slice(&(data.len() as u16).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// A 517-byte TLS 1.3 ClientHello for `domain` whose random is
/// HMAC-SHA256(secret, hello with the random zeroed), its last 4 bytes
/// XORed with the little-endian unix time (the fake-TLS convention).
fn client_hello(secret: &[u8; 16], domain: &str) -> Vec<u8> {
    let sn = domain.as_bytes();
    let mut m: Vec<u8> = vec![0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3];
    m.extend_from_slice(&[0; 32]);
    m.push(0x20);
    m.extend_from_slice(&rand::random::<[u8; 32]>());
    m.extend_from_slice(&[
        0x00, 0x22, 0x4a, 0x4a, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2b, 0xc0, 0x2f, 0xc0,
        0x2c, 0xc0, 0x30, 0xcc, 0xa9, 0xcc, 0xa8, 0xc0, 0x13, 0xc0, 0x14, 0x00, 0x9c, 0x00, 0x9d,
        0x00, 0x2f, 0x00, 0x35, 0x00, 0x0a, 0x01, 0x00, 0x01, 0x91, 0xda, 0xda, 0x00, 0x00, 0x00,
        0x00,
    ]);
    // server_name extension body.
    m.extend_from_slice(&((sn.len() + 5) as u16).to_be_bytes());
    m.extend_from_slice(&((sn.len() + 3) as u16).to_be_bytes());
    m.push(0);
    m.extend_from_slice(&(sn.len() as u16).to_be_bytes());
    m.extend_from_slice(sn);
    m.extend_from_slice(&[
        0x00, 0x17, 0x00, 0x00, 0xff, 0x01, 0x00, 0x01, 0x00, 0x00, 0x0a, 0x00, 0x0a, 0x00, 0x08,
        0xaa, 0xaa, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18, 0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, 0x00,
        0x23, 0x00, 0x00, 0x00, 0x10, 0x00, 0x0e, 0x00, 0x0c, 0x02, 0x68, 0x32, 0x08, 0x68, 0x74,
        0x74, 0x70, 0x2f, 0x31, 0x2e, 0x31, 0x00, 0x05, 0x00, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x0d, 0x00, 0x14, 0x00, 0x12, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03, 0x08,
        0x05, 0x05, 0x01, 0x08, 0x06, 0x06, 0x01, 0x02, 0x01, 0x00, 0x12, 0x00, 0x00, 0x00, 0x33,
        0x00, 0x2b, 0x00, 0x29, 0xaa, 0xaa, 0x00, 0x01, 0x00, 0x00, 0x1d, 0x00, 0x20,
    ]);
    m.extend_from_slice(&rand::random::<[u8; 32]>()); // key share
    m.extend_from_slice(&[
        0x00, 0x2d, 0x00, 0x02, 0x01, 0x01, 0x00, 0x2b, 0x00, 0x0b, 0x0a, 0xba, 0xba, 0x03, 0x04,
        0x03, 0x03, 0x03, 0x02, 0x03, 0x01, 0x00, 0x1b, 0x00, 0x03, 0x02, 0x00, 0x02, 0x3a, 0x3a,
        0x00, 0x01, 0x00, 0x00, 0x15,
    ]);
    // Padding extension up to 517 bytes.
    let pad = 517usize.saturating_sub(m.len() + 2);
    m.extend_from_slice(&(pad as u16).to_be_bytes());
    m.resize(517, 0);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(&m);
    let d = mac.finalize().into_bytes();
    let t = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as u32)
        .to_le_bytes();
    m[11..39].copy_from_slice(&d[..28]);
    for i in 0..4 {
        m[39 + i] = d[28 + i] ^ t[i];
    }
    m
}

/// ServerHello, ChangeCipherSpec and the first application-data record,
/// exactly as received.
async fn read_server_hello(s: &mut TcpStream) -> Result<Vec<u8>, Verdict> {
    let mut buf = Vec::new();
    let mut types = Vec::new();
    let mut pos = 0;
    while types.len() < 3 {
        let mut hdr = [0u8; 5];
        if s.read_exact(&mut hdr).await.is_err() {
            return Err(if buf.is_empty() {
                Verdict::NoServerHello("closed without a TLS answer".into())
            } else {
                Verdict::NoServerHello(format!("closed after {} bytes", buf.len()))
            });
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        buf.extend_from_slice(&hdr);
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).await.is_err() {
            return Err(Verdict::NoServerHello("truncated TLS answer".into()));
        }
        buf.extend_from_slice(&body);
        types.push(hdr[0]);
        pos += 5 + len;
        let want = [0x16, 0x14, 0x17][types.len() - 1];
        if hdr[0] != want {
            return Err(Verdict::NoServerHello(format!(
                "TLS answer is not ServerHello+CCS+data (record {:#04x})",
                hdr[0]
            )));
        }
    }
    buf.truncate(pos);
    Ok(buf)
}

/// server random = HMAC-SHA256(secret, client_random ‖ reply with the
/// server random (32 bytes at offset 11) zeroed).
fn server_hello_signed(secret: &[u8; 16], client_random: &[u8], reply: &[u8]) -> bool {
    if reply.len() < 43 {
        return false;
    }
    let mut zeroed = reply.to_vec();
    zeroed[11..43].fill(0);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(client_random);
    mac.update(&zeroed);
    mac.verify_slice(&reply[11..43]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_secrets() {
        assert!(matches!(
            Secret::parse("dd00000000000000000000000000000001"),
            Some(Secret::Obfuscated(k)) if k[15] == 1
        ));
        assert!(matches!(
            Secret::parse("00000000000000000000000000000002"),
            Some(Secret::Obfuscated(k)) if k[15] == 2
        ));
        assert_eq!(
            Secret::parse("ee000000000000000000000000000000036578616d706c652e636f6d"),
            Some(Secret::FakeTls(
                {
                    let mut k = [0; 16];
                    k[15] = 3;
                    k
                },
                "example.com".into()
            ))
        );
        assert_eq!(Secret::parse("dd00"), None);
    }

    #[test]
    fn proxy_can_decrypt_what_the_probe_sends() {
        // Play the proxy: derive its ciphers from the clear part of the
        // header and check it reads the tag and the frame.
        let secret = [7u8; 16];
        let (wire, mut enc, _) = handshake(&secret);
        let (msg, _) = req_pq_multi();
        let mut frame = padded_frame(&msg);
        enc.apply_keystream(&mut frame);
        let (mut proxy_dec, _) = ciphers(&wire, &secret);
        let mut hdr = wire;
        proxy_dec.apply_keystream(&mut hdr);
        assert_eq!(hdr[56..60], TAG_PADDED);
        assert_eq!(i16::from_le_bytes([hdr[60], hdr[61]]), DC);
        proxy_dec.apply_keystream(&mut frame);
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(&frame[4..4 + msg.len()], &msg[..]);
        assert!(len >= msg.len() && len < msg.len() + 16);
    }

    #[test]
    fn client_hello_carries_the_secret_hmac() {
        let secret = [9u8; 16];
        let h = client_hello(&secret, "example.com");
        assert_eq!(h.len(), 517);
        let mut zeroed = h.clone();
        zeroed[11..43].fill(0);
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
        mac.update(&zeroed);
        let d = mac.finalize().into_bytes();
        assert_eq!(&h[11..39], &d[..28]);
        let t = u32::from_le_bytes([h[39] ^ d[28], h[40] ^ d[29], h[41] ^ d[30], h[42] ^ d[31]]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        assert!(now.abs_diff(t) < 5);
        assert!(h.windows(11).any(|w| w == b"example.com"));
    }

    /// A plain server that greets and then echoes is "not MTProxy" on
    /// every probe, at once: the greeting never decrypts to a length worth
    /// waiting for (each probe has a fresh key, so many are tried).
    #[tokio::test]
    async fn a_greeting_echo_server_is_not_mtproxy_every_time() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = c.write_all(b"mtp2\n").await;
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let secret = "dd0123456789abcdef0123456789abcdef";
        for i in 0..1000 {
            let r = check(addr, secret, Duration::from_secs(5)).await;
            assert!(
                !r.ok && r.reason == reason::WRONG_SECRET,
                "probe {i}: {} ({:?})",
                r.reason,
                r.info
            );
        }
    }

    #[test]
    fn server_hello_signature() {
        let secret = [1u8; 16];
        let client_random = [2u8; 32];
        let mut reply = tls_record(0x16, &[0u8; 90]);
        reply.extend(tls_record(0x14, &[1]));
        reply.extend(tls_record(0x17, &[5u8; 40]));
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
        mac.update(&client_random);
        mac.update(&reply);
        let d = mac.finalize().into_bytes();
        reply[11..43].copy_from_slice(&d);
        assert!(server_hello_signed(&secret, &client_random, &reply));
        assert!(!server_hello_signed(&[3u8; 16], &client_random, &reply));
    }
}
