//! The raw S3 references of the benchmark: what a direct client (aws-sdk-s3, through the
//! same `store::s3` layer, no FUSE, no cache) achieves against the same server, so the mount's
//! figures can be read as ratios of what the server allows.
//!
//! Run by `benches/run.sh`; by hand:
//! `cargo bench --bench raw_s3 -- put KEY SIZE_MIB` (and `get KEY`, `copy SRC DST`, `move SRC DST`,
//! `size KEY`, `put-many PREFIX COUNT`, `put-many-s3fs PREFIX COUNT`, `head-all PREFIX
//! CONCURRENCY`, `delete-prefix PREFIX`). Endpoint, bucket and credentials come
//! from the environment that `tests/support/garage.sh start` prints. Each command prints
//! one line: `seconds=<elapsed>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use s3bridge::store::s3::{S3Options, S3Store};
use s3bridge::store::{CompletedPart, Expect, ObjectStore, WriteHeaders};

mod support;

/// The part size and concurrency the mount uses by default, so both sides move the same
/// requests: 8 MiB parts, 8 uploads or 16 GETs in flight (two read-ahead windows' worth).
const PART: u64 = 8 << 20;
const PUT_CONCURRENCY: usize = 8;
const GET_CONCURRENCY: usize = 16;

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set (source garage.sh's output)"))
}

#[tokio::main]
async fn main() {
    let Some(args) = support::args_or_usage(
        "raw_s3 put KEY MIB | get KEY | copy SRC DST | move SRC DST | size KEY | put-many PREFIX N \
         | put-many-s3fs PREFIX N | head-all PREFIX CONCURRENCY | delete-prefix PREFIX",
        1,
    ) else {
        return;
    };
    let store: Arc<dyn ObjectStore> = Arc::new(
        S3Store::connect(&S3Options {
            bucket: env("S3BRIDGE_TEST_BUCKET"),
            endpoint_url: Some(env("S3BRIDGE_TEST_ENDPOINT")),
            region: Some("us-east-1".into()),
            force_path_style: true,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
        })
        .await,
    );
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            panic!("usage: raw_s3 put|get|copy|move|size|put-many|put-many-s3fs|head-all|count|delete-prefix ARGS")
        })
    };
    let started = Instant::now();
    match arg(0) {
        "put" => put(&store, arg(1), arg(2).parse::<u64>().unwrap() << 20).await,
        "get" => get(&store, arg(1)).await,
        "copy" => {
            let info = store.head(arg(1)).await.unwrap();
            store
                .copy(arg(1), arg(2), Some(&info.etag), &WriteHeaders::default())
                .await
                .unwrap();
        }
        "move" => {
            let info = store.head(arg(1)).await.unwrap();
            store
                .copy(arg(1), arg(2), Some(&info.etag), &WriteHeaders::default())
                .await
                .unwrap();
            store.delete(arg(1)).await.unwrap();
        }
        "size" => {
            // Size of an object, or -1: used to see when an upload after close() landed.
            let size = store.head(arg(1)).await.map_or(-1, |i| i.size as i64);
            println!("size={size}");
            return;
        }
        "put-many" => {
            put_many(&store, arg(1), arg(2).parse().unwrap(), |_| {
                WriteHeaders::default()
            })
            .await
        }
        "put-many-s3fs" => put_many(&store, arg(1), arg(2).parse().unwrap(), s3fs_headers).await,
        "head-all" => head_all(&store, arg(1), arg(2).parse().unwrap()).await,
        "count" => {
            // Objects under a prefix: to check that a moved folder arrived whole.
            println!("count={}", list_all(&store, arg(1)).await.len());
            return;
        }
        "delete-prefix" => {
            let keys = list_all(&store, arg(1)).await;
            for chunk in keys.chunks(1000) {
                store.delete_many(chunk).await.unwrap();
            }
        }
        other => panic!("unknown command {other}"),
    }
    println!("seconds={:.3}", started.elapsed().as_secs_f64());
}

/// Multipart upload of `size` pseudo-random bytes, parts sent concurrently.
async fn put(store: &Arc<dyn ObjectStore>, key: &str, size: u64) {
    let body: Bytes = (0..size as usize)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let started = Instant::now();
    let id = store
        .create_multipart(key, &WriteHeaders::default())
        .await
        .unwrap();
    let sends: Vec<_> = (0..size)
        .step_by(PART as usize)
        .enumerate()
        .map(|(i, start)| {
            let part = body.slice(start as usize..(start + PART).min(size) as usize);
            let (store, id) = (store.clone(), id.clone());
            async move {
                let number = i as i32 + 1;
                let etag = store.upload_part(key, &id, number, part).await.unwrap();
                CompletedPart { number, etag }
            }
        })
        .collect();
    let parts: Vec<CompletedPart> = futures::stream::iter(sends)
        .buffered(PUT_CONCURRENCY)
        .collect()
        .await;
    store
        .complete_multipart(key, &id, &parts, Expect::Any)
        .await
        .unwrap();
    // Only the transfer is timed, not making up the bytes.
    println!("transfer_seconds={:.3}", started.elapsed().as_secs_f64());
}

/// Ranged GETs of the whole object, concurrently.
async fn get(store: &Arc<dyn ObjectStore>, key: &str) {
    let info = store.head(key).await.unwrap();
    let gets: Vec<_> = (0..info.size)
        .step_by(PART as usize)
        .map(|start| {
            let (store, etag) = (store.clone(), info.etag.clone());
            async move {
                let range = start..(start + PART).min(info.size);
                store
                    .get_range(key, range, Some(&etag))
                    .await
                    .unwrap()
                    .len() as u64
            }
        })
        .collect();
    let total: u64 = futures::stream::iter(gets)
        .buffer_unordered(GET_CONCURRENCY)
        .collect::<Vec<u64>>()
        .await
        .into_iter()
        .sum();
    assert_eq!(total, info.size);
}

/// `count` objects of 1 KiB under `prefix` with the headers `headers(i)`, 64 at a time.
async fn put_many(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    count: usize,
    headers: impl Fn(usize) -> WriteHeaders,
) {
    let body = Bytes::from(vec![b'x'; 1024]);
    futures::stream::iter(0..count)
        .map(|i| {
            let (store, body) = (store.clone(), body.clone());
            let key = format!("{prefix}f{i:05}");
            let headers = headers(i);
            async move {
                store.put(&key, body, &headers, Expect::Any).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// The headers s3fs writes for a file of a Nextcloud data directory: mode 0640, owner
/// www-data, mtimes a second apart.
fn s3fs_headers(i: usize) -> WriteHeaders {
    let mut h = WriteHeaders::default();
    for (k, v) in [
        ("mode", (0o100640u32).to_string()),
        ("uid", "33".into()),
        ("gid", "33".into()),
        ("mtime", (1_600_000_000 + i).to_string()),
    ] {
        h.metadata.insert(k.into(), v);
    }
    h
}

/// What an exact listing costs at least: every page of `prefix`, and a HEAD of every object,
/// `concurrency` at a time.
async fn head_all(store: &Arc<dyn ObjectStore>, prefix: &str, concurrency: usize) {
    let keys = list_all(store, prefix).await;
    futures::stream::iter(keys)
        .map(|key| {
            let store = store.clone();
            async move { store.head(&key).await.unwrap() }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
}

async fn list_all(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let page = store
            .list(prefix, None, token.as_deref(), None)
            .await
            .unwrap();
        keys.extend(page.objects.into_iter().map(|o| o.key));
        match page.next_token {
            Some(t) => token = Some(t),
            None => return keys,
        }
    }
}
