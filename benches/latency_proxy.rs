//! A TCP proxy that delays every byte by a fixed time in each direction: emulated network
//! latency for the benchmark where `tc qdisc ... netem` is not available (no `sch_netem`).
//!
//! `latency_proxy LISTEN_ADDR TARGET_ADDR DELAY_MS` — prints `listening=ADDR` once ready.
//! Data keeps its order and its throughput: each chunk is stamped when it arrives and sent on
//! `DELAY_MS` later, so a request's round trip grows by twice the delay, like a link with that
//! one-way latency (20 ms of round trip for 10 ms, a nearby S3 region).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

mod support;

#[tokio::main]
async fn main() {
    let Some(args) = support::args_or_usage("latency_proxy LISTEN_ADDR TARGET_ADDR DELAY_MS", 3)
    else {
        return;
    };
    let delay = Duration::from_secs_f64(args[2].parse::<f64>().expect("DELAY_MS") / 1000.0);
    let listener = TcpListener::bind(&args[0]).await.expect("bind");
    println!("listening={}", listener.local_addr().unwrap());
    loop {
        let (client, _) = listener.accept().await.expect("accept");
        let target = args[1].clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, delay));
            tokio::spawn(pipe(sr, cw, delay));
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it arrived.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        let _ = tx.send((Instant::now() + delay, buf[..n].to_vec()));
        if n == 0 {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
