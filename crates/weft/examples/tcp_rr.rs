//! A TCP request/response benchmark (netperf's TCP_RR): one connection, one byte each way,
//! as many round trips as fit in the time given; prints transactions per second.
//!
//!   tcp_rr server PORT
//!   tcp_rr client ADDR PORT SECONDS

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("server") => {
            let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(7777);
            // Both families where the namespace has IPv6 (a v4-mapped listener), else IPv4.
            let l = TcpListener::bind(("::", port))
                .or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
            // One client at a time, each to its end.
            for s in l.incoming() {
                let mut s = s?;
                s.set_nodelay(true)?;
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            }
            Ok(())
        }
        Some("client") => {
            let (addr, port, secs) = match (args.get(2), args.get(3), args.get(4)) {
                (Some(a), Some(p), Some(t)) => (
                    a.clone(),
                    p.parse::<u16>().unwrap_or(7777),
                    t.parse::<f64>().unwrap_or(5.0),
                ),
                _ => {
                    eprintln!("usage: tcp_rr client ADDR PORT SECONDS");
                    std::process::exit(2);
                }
            };
            let mut s = TcpStream::connect((addr.as_str(), port))?;
            s.set_nodelay(true)?;
            let mut b = [1u8; 1];
            // A short warm-up, then the measured run.
            let warm = Instant::now();
            while warm.elapsed() < Duration::from_millis(300) {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
            }
            let (t, mut n) = (Instant::now(), 0u64);
            let d = Duration::from_secs_f64(secs);
            while t.elapsed() < d {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                n += 1;
            }
            println!("{:.0}", n as f64 / t.elapsed().as_secs_f64());
            Ok(())
        }
        _ => {
            eprintln!("usage: tcp_rr server PORT | tcp_rr client ADDR PORT SECONDS");
            std::process::exit(2);
        }
    }
}
