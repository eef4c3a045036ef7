//! HEAD requests signed and sent here, past the SDK's request pipeline.
//!
//! A listing on a fresh mount reads the headers of every object it names (`fs/listing.rs`):
//! 10,000 HEADs for an `ls -l` of 10,000 files. A HEAD carries no body, so its cost is all
//! per-request work, and through aws-sdk-s3 that work is large: interceptors, the endpoint
//! rules evaluated again for every request, a type-erased configuration bag, retry and
//! identity machinery, and some 40 response headers parsed into an output struct. Measured
//! here (10,000 HEADs, 64 in flight, Garage on the same two cores): ~160 µs of client CPU per
//! HEAD through the SDK — as much as the server's own work for it — against ~60 µs on this
//! path (10,000 HEADs with the 10 LIST pages naming them: 1.6-1.8 s of client CPU before,
//! 0.64-0.75 s after; 2.1-2.5 s of wall time before, 1.2-1.3 s after). On two cores every
//! microsecond of it is taken from the server answering the listing.
//!
//! Everything else a HEAD needs is still the SDK's, taken from it once: where the request
//! goes and the region it is signed for (read off a HEAD the SDK presigns offline, so every
//! endpoint setting it honours is honoured here; anything but plain SigV4, and a configured
//! proxy, keep the SDK path), the credentials chain (cached here until 10 s before expiry, the
//! SDK identity cache's margin), and the retry bounds of [`S3Options`](super::s3::S3Options).
//! The other requests stay with the SDK: their cost is in their bodies, or they are few.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::{DateTime, date_time};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tracing::debug;

use super::s3::{error_chain, to_system_time};
use super::{ObjectInfo, StoreError, StoreResult};

/// Bytes of a key sent as they are in a request path; all others are percent-encoded, as
/// SigV4 requires for S3 (the path is then signed as sent, not encoded twice).
const KEY_IN_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Credentials this close to their expiry are fetched again before use (the SDK identity
/// cache's default buffer).
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(10);

/// First wait between attempts, doubled each time up to [`MAX_BACKOFF`], with full jitter:
/// the SDK's standard retry mode, so both paths behave alike in an outage.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where requests go and how they are signed: resolved once, from the SDK.
#[derive(Debug, Clone)]
pub struct Target {
    /// The bucket's URL, without a trailing slash: `https://bucket.s3.eu-west-1.amazonaws.com`
    /// or, path style, `http://127.0.0.1:3900/bucket`.
    pub bucket_url: String,
    /// Region the requests are signed for.
    pub signing_region: String,
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Time allowed for opening a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt.
    pub attempt_timeout: Duration,
}

/// Signs HEAD requests with SigV4 and sends them on a pooled HTTP/1.1 client (hyper): on
/// this machine ~60 µs of client CPU per HEAD (user and system), a third of the SDK's
/// (module docs).
pub struct DirectClient {
    http: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    target: Target,
    retries: Retries,
    credentials: CredentialCache,
}

impl std::fmt::Debug for DirectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// An attempt's failure, and whether another attempt may succeed.
enum Failure {
    Retry(StoreError),
    Final(StoreError),
}

impl DirectClient {
    /// A client for `target`; `None` where it cannot be built (no TLS roots on this system
    /// for an `https` endpoint), and the SDK path serves instead.
    pub fn new(
        target: Target,
        credentials: SharedCredentialsProvider,
        retries: Retries,
    ) -> Option<DirectClient> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(retries.connect_timeout));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
        {
            Ok(b) => b,
            Err(e) => {
                debug!("HEADs go through the SDK: no TLS roots for the direct client: {e}");
                return None;
            }
        };
        let connector = tls.https_or_http().enable_http1().wrap_connector(tcp);
        Some(DirectClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            target,
            retries,
            credentials: CredentialCache::new(credentials),
        })
    }

    /// HEAD of `key`: its size, ETag, Last-Modified, type and user metadata.
    pub async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        let url = format!(
            "{}/{}",
            self.target.bucket_url,
            utf8_percent_encode(key, KEY_IN_PATH)
        );
        let mut backoff = INITIAL_BACKOFF;
        let mut attempt = 1;
        loop {
            let outcome =
                match tokio::time::timeout(self.retries.attempt_timeout, self.attempt(&url, key))
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::Retry(StoreError::Unavailable(format!(
                        "HEAD {key}: no answer within {:?}",
                        self.retries.attempt_timeout
                    )))),
                };
            match outcome {
                Ok(info) => return Ok(info),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Retry(e)) if attempt >= self.retries.max_attempts => return Err(e),
                Err(Failure::Retry(e)) => {
                    debug!(key, attempt, "HEAD failed, retrying: {e}");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, url: &str, key: &str) -> Result<ObjectInfo, Failure> {
        let credentials = self.credentials.get().await.map_err(Failure::Final)?;
        let mut request = http::Request::head(url)
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::Final(StoreError::Other(format!("HEAD {key}: {e}"))))?;
        self.sign(&mut request, credentials)
            .map_err(|e| Failure::Final(StoreError::Other(format!("signing HEAD {key}: {e}"))))?;
        let response = self.http.request(request).await.map_err(|e| {
            Failure::Retry(StoreError::Unavailable(format!(
                "HEAD {key}: {}",
                error_chain(&e)
            )))
        })?;
        let status = response.status().as_u16();
        let what = || format!("HEAD {key} answered HTTP {status}");
        match status {
            200 => Ok(object_info(key, response.headers())),
            404 => Err(Failure::Final(StoreError::NotFound(key.to_string()))),
            412 => Err(Failure::Final(StoreError::PreconditionFailed(
                key.to_string(),
            ))),
            401 | 403 => Err(Failure::Final(StoreError::AccessDenied(what()))),
            429 | 500.. => Err(Failure::Retry(StoreError::Unavailable(what()))),
            _ => Err(Failure::Final(StoreError::Other(what()))),
        }
    }

    /// Adds the SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256` and,
    /// for temporary credentials, `x-amz-security-token`) to `request`.
    fn sign(
        &self,
        request: &mut http::Request<Empty<Bytes>>,
        credentials: Credentials,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let identity = Identity::from(credentials);
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.target.signing_region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let uri = request.uri().to_string();
        let signable = SignableRequest::new(
            "HEAD",
            uri.as_str(),
            std::iter::empty(),
            SignableBody::Bytes(&[]),
        )?;
        let (instructions, _signature) = sign(signable, &params)?.into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

/// What the headers of a HEAD's answer say about the object.
fn object_info(key: &str, headers: &http::HeaderMap) -> ObjectInfo {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let metadata = headers
        .iter()
        .filter_map(|(name, value)| {
            let name = name.as_str().strip_prefix("x-amz-meta-")?;
            // S3 sends metadata as it was stored; s3fs's values are ASCII, others may be
            // UTF-8, which `to_str` refuses.
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            Some((name.to_string(), value))
        })
        .collect();
    ObjectInfo {
        key: key.to_string(),
        size: text("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        etag: text("etag").unwrap_or_default().to_string(),
        last_modified: to_system_time(
            text("last-modified")
                .and_then(|v| DateTime::from_str(v, date_time::Format::HttpDate).ok())
                .as_ref(),
        ),
        content_type: text("content-type").map(str::to_string),
        metadata,
    }
}

/// A wait of up to `cap`, uniformly drawn ("full jitter"), so that requests that failed
/// together do not all come back together.
fn jittered(cap: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Each RandomState is seeded afresh: a random draw without a random-number crate.
    let mut draw = std::collections::hash_map::RandomState::new().build_hasher();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    draw.write_u128(now.unwrap_or_default().as_nanos());
    cap.mul_f64((draw.finish() >> 11) as f64 / (1u64 << 53) as f64)
}

/// The credentials chain's answer, kept until it nears expiry: the chain itself may read
/// files or ask the instance metadata service each time.
struct CredentialCache {
    provider: SharedCredentialsProvider,
    current: RwLock<Option<Credentials>>,
    /// One refresh at a time; the others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
}

impl CredentialCache {
    fn new(provider: SharedCredentialsProvider) -> CredentialCache {
        CredentialCache {
            provider,
            current: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The cached credentials if they are good for at least `margin` more.
    fn valid(&self, margin: Duration) -> Option<Credentials> {
        let current = self.current.read().unwrap();
        current
            .as_ref()
            .filter(|c| c.expiry().is_none_or(|at| at > SystemTime::now() + margin))
            .cloned()
    }

    async fn get(&self) -> StoreResult<Credentials> {
        if let Some(c) = self.valid(CREDENTIALS_MARGIN) {
            return Ok(c);
        }
        let _refreshing = self.refreshing.lock().await;
        if let Some(c) = self.valid(CREDENTIALS_MARGIN) {
            return Ok(c);
        }
        match self.provider.provide_credentials().await {
            Ok(fresh) => {
                *self.current.write().unwrap() = Some(fresh.clone());
                Ok(fresh)
            }
            // A failed refresh is no reason to stop using credentials that still hold.
            Err(e) => self
                .valid(Duration::ZERO)
                .ok_or_else(|| StoreError::Other(format!("no credentials: {}", error_chain(&e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_once_with_slashes_kept() {
        let encoded = utf8_percent_encode("a b/ü+c~d.e_f-g", KEY_IN_PATH).to_string();
        assert_eq!(encoded, "a%20b/%C3%BC%2Bc~d.e_f-g");
    }

    #[test]
    fn answers_become_object_info() {
        let mut h = http::HeaderMap::new();
        h.insert("content-length", "1234".parse().unwrap());
        h.insert("etag", "\"abc\"".parse().unwrap());
        h.insert(
            "last-modified",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert("x-amz-meta-mode", "33188".parse().unwrap());
        h.insert(
            "x-amz-meta-note",
            http::HeaderValue::from_bytes("é".as_bytes()).unwrap(),
        );
        let info = object_info("k", &h);
        assert_eq!(info.size, 1234);
        assert_eq!(info.etag, "\"abc\"");
        assert_eq!(
            info.last_modified,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
        );
        assert_eq!(info.content_type.as_deref(), Some("text/plain"));
        assert_eq!(info.metadata["mode"], "33188");
        assert_eq!(info.metadata["note"], "é");
    }

    #[test]
    fn jitter_stays_within_its_cap_and_varies() {
        let cap = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..100).map(|_| jittered(cap)).collect();
        assert!(draws.iter().all(|d| *d <= cap));
        assert!(draws.iter().any(|d| *d != draws[0]), "{draws:?}");
    }
}
