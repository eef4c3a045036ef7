//! [`ObjectStore`] on aws-sdk-s3: real AWS or any S3-compatible server.
//!
//! HEADs are the exception: where the SDK would sign them with plain SigV4 they are signed
//! and sent by [`DirectClient`] (`store/direct.rs`), with the same bounds on attempts and
//! time, at a third of the SDK pipeline's CPU per request.
//!
//! Retries and timeouts come from the SDK's standard retry mode (exponential backoff with
//! jitter on 5xx, SlowDown, throttling, timeouts and connection resets), configured from
//! [`S3Options`]. The one thing the SDK does not cover is a response body that stalls or breaks
//! after the headers arrived, so GET bodies get their own timeout and retry here.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, Delete, MetadataDirective, ObjectIdentifier};
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use tracing::debug;

use aws_credential_types::provider::SharedCredentialsProvider;

use super::direct::{self, DirectClient};
use super::{
    CompletedPart, Expect, ListPage, ListedObject, ObjectInfo, ObjectStore, StoreError,
    StoreResult, WriteHeaders,
};

/// How to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Custom endpoint (MinIO, Garage, Ceph, R2, ...); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` takes it from the AWS configuration chain, then `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`) instead of virtual-hosted style.
    pub force_path_style: bool,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt of one request, body transfer included.
    pub attempt_timeout: Duration,
}

/// Where the credentials of a mount come from, as the AWS credential chain found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    Environment,
    /// A profile of `~/.aws/credentials` or `~/.aws/config` (`AWS_PROFILE`,
    /// `AWS_SHARED_CREDENTIALS_FILE`, fstab's `credentials=`), keys, SSO or a process.
    Profile,
    /// A web identity token (`AWS_WEB_IDENTITY_TOKEN_FILE`: EKS, CI systems).
    WebIdentity,
    /// The container credentials endpoint (ECS, Fargate).
    Container,
    /// The EC2 instance role, through the instance metadata service.
    InstanceRole,
    /// A source the chain did not name.
    Other,
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CredentialSource::Environment => "the environment (AWS_ACCESS_KEY_ID)",
            CredentialSource::Profile => "a profile of the shared files (~/.aws/credentials)",
            CredentialSource::WebIdentity => "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)",
            CredentialSource::Container => "the container credentials endpoint",
            CredentialSource::InstanceRole => "the EC2 instance role (instance metadata)",
            CredentialSource::Other => "the AWS credential chain",
        })
    }
}

/// The aws-sdk-s3 object store.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    attempt_timeout: Duration,
    max_attempts: u32,
    /// What it was built from, for [`ObjectStore::separate`].
    opts: S3Options,
    /// HEADs without the SDK's pipeline, where the endpoint allows it (`store/direct.rs`).
    direct: Option<Arc<DirectClient>>,
    /// The credential chain requests are signed from (`None`: none is configured at all).
    credentials: Option<SharedCredentialsProvider>,
}

impl S3Store {
    /// Builds a client from the standard AWS credential chain (environment, profile, web
    /// identity, instance role) and the given options.
    pub async fn connect(opts: &S3Options) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &opts.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .cloned()
            .unwrap_or_else(|| Region::new("us-east-1"));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout)
            .operation_attempt_timeout(opts.attempt_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(opts.max_attempts.max(1))
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(10));
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .region(region)
            .force_path_style(opts.force_path_style)
            .timeout_config(timeouts)
            .retry_config(retry)
            // Checksums only where S3 requires them: S3-compatible servers (Garage among them)
            // reject streamed uploads and multipart completions carrying the SDK's default
            // CRC32 trailers, and AWS accepts both.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &opts.endpoint_url {
            builder = builder.endpoint_url(endpoint);
        }
        let client = Client::from_conf(builder.build());
        let credentials = shared.credentials_provider();
        let direct = direct_client(&client, credentials.clone(), opts)
            .await
            .map(Arc::new);
        S3Store {
            client,
            bucket: opts.bucket.clone(),
            attempt_timeout: opts.attempt_timeout,
            max_attempts: opts.max_attempts.max(1),
            opts: opts.clone(),
            direct,
            credentials,
        }
    }

    /// Loads the credentials requests will be signed with and says where they came from.
    /// Without this, a chain that finds nothing surfaces only inside the first request's
    /// error, as a failure to reach the instance metadata service: a missing key would read
    /// as an unreachable server.
    pub async fn load_credentials(&self) -> Result<CredentialSource, StoreError> {
        use aws_credential_types::credential_feature::AwsCredentialFeature as F;
        use aws_credential_types::provider::ProvideCredentials;
        use aws_credential_types::provider::error::CredentialsError;
        let provider = self.credentials.as_ref().ok_or(StoreError::NoCredentials(
            "no credential provider is configured".into(),
        ))?;
        let creds = provider.provide_credentials().await.map_err(|e| match e {
            CredentialsError::CredentialsNotLoaded(_) => {
                StoreError::NoCredentials("no source had any".into())
            }
            // The chain stops at a source that fails (here often the instance metadata
            // service, last in the chain, refusing a machine that is no EC2 instance).
            other => StoreError::NoCredentials(format!(
                "the last source tried answered: {}",
                error_chain(&other)
            )),
        })?;
        let features = creds.get_property::<Vec<F>>().cloned().unwrap_or_default();
        // The first source named, in the order the chain tries them.
        let source = features.iter().find_map(|f| match f {
            F::CredentialsEnvVars => Some(CredentialSource::Environment),
            F::CredentialsProfile
            | F::CredentialsProfileSourceProfile
            | F::CredentialsProfileNamedProvider
            | F::CredentialsProfileProcess
            | F::CredentialsProfileSso
            | F::CredentialsProfileStsWebIdToken
            | F::CredentialsProfileLogin => Some(CredentialSource::Profile),
            F::CredentialsEnvVarsStsWebIdToken | F::CredentialsStsAssumeRoleWebId => {
                Some(CredentialSource::WebIdentity)
            }
            F::CredentialsHttp => Some(CredentialSource::Container),
            F::CredentialsImds => Some(CredentialSource::InstanceRole),
            _ => None,
        });
        Ok(source.unwrap_or(CredentialSource::Other))
    }

    /// One GET of `range`, its body read into buffers of `piece` bytes as it arrives.
    async fn get_once(
        &self,
        key: &str,
        range: &Range<u64>,
        if_match: Option<&str>,
        piece: usize,
    ) -> StoreResult<Vec<Bytes>> {
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(header)
            .set_if_match(if_match.map(str::to_string))
            .send()
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            // A range starting at or past the end of the object.
            Err(e) if status_of(&e) == Some(416) => return Ok(Vec::new()),
            Err(e) => return Err(classify(e, key)),
        };
        let total = resp
            .content_length()
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or((range.end - range.start) as usize);
        let mut body = resp.body;
        let read = async {
            let mut pieces = Vec::with_capacity(total.div_ceil(piece));
            let mut current = crate::buffers::buffer(piece.min(total));
            let mut left = total;
            while let Some(chunk) = body.next().await {
                let mut chunk =
                    chunk.map_err(|e| StoreError::Unavailable(format!("GET {key}: body: {e}")))?;
                while !chunk.is_empty() {
                    let take = chunk.len().min(piece - current.len());
                    current.extend_from_slice(&chunk.split_to(take));
                    left = left.saturating_sub(take);
                    if current.len() == piece {
                        pieces.push(crate::buffers::freeze(current));
                        current = crate::buffers::buffer(piece.min(left.max(1)));
                    }
                }
            }
            if !current.is_empty() {
                pieces.push(crate::buffers::freeze(current));
            }
            Ok(pieces)
        };
        tokio::time::timeout(self.attempt_timeout, read)
            .await
            .map_err(|_| StoreError::Unavailable(format!("GET {key}: body timed out")))?
    }
}

fn status_of<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Maps an SDK error (after the SDK's own retries) onto [`StoreError`].
/// The direct HEAD client for `client`, sending HEADs exactly where the SDK would: the
/// endpoint and signing region are read off a HEAD the SDK presigns (offline: no request is
/// sent), so every source of endpoint configuration the SDK reads (`--endpoint-url`,
/// `AWS_ENDPOINT_URL_S3`, a profile's `endpoint_url` or `[services]`, FIPS, dual-stack) is
/// honoured. `None` — the SDK serves HEADs too — unless that request is signed with plain
/// SigV4 (not SigV4a, not an S3 Express session), and when a proxy is configured in the
/// environment, which the SDK's HTTP client follows and this one does not.
async fn direct_client(
    client: &Client,
    credentials: Option<SharedCredentialsProvider>,
    opts: &S3Options,
) -> Option<DirectClient> {
    const PROBE: &str = "s3bridge-endpoint-probe";
    let proxies = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ];
    if let Some(var) = proxies.iter().find(|v| std::env::var_os(v).is_some()) {
        debug!("HEADs go through the SDK, which follows {var}");
        return None;
    }
    let config =
        aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(60)).ok()?;
    let presigned = client
        .head_object()
        .bucket(&opts.bucket)
        .key(PROBE)
        .presigned(config)
        .await
        .map_err(|e| {
            debug!(
                "HEADs go through the SDK: no presigned HEAD: {}",
                error_chain(&e)
            )
        })
        .ok()?;
    let target = direct_target(presigned.uri(), PROBE);
    if target.is_none() {
        debug!(
            uri = presigned.uri(),
            "HEADs go through the SDK: not a plain SigV4 request"
        );
    }
    let retries = direct::Retries {
        max_attempts: opts.max_attempts.max(1),
        connect_timeout: opts.connect_timeout,
        attempt_timeout: opts.attempt_timeout,
    };
    DirectClient::new(target?, credentials?, retries)
}

/// Where the presigned URL `uri` of a HEAD of `key` goes and how it is signed: the bucket's
/// URL (the URL without the key and the query) and the region of its SigV4 credential scope
/// (`X-Amz-Credential=AKID/DATE/REGION/s3/aws4_request`). `None` for any other signature.
fn direct_target(uri: &str, key: &str) -> Option<direct::Target> {
    let (base, query) = uri.split_once('?')?;
    let bucket_url = base.strip_suffix(key)?.strip_suffix('/')?.to_string();
    let param = |name: &str| {
        query.split('&').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.eq_ignore_ascii_case(name).then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    };
    if param("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" || param("X-Amz-S3session-Token").is_some() {
        return None;
    }
    let scope = param("X-Amz-Credential")?;
    let mut parts = scope.rsplit('/');
    let (terminator, service, region) = (parts.next()?, parts.next()?, parts.next()?);
    if terminator != "aws4_request" || service != "s3" {
        return None;
    }
    Some(direct::Target {
        bucket_url,
        signing_region: region.to_string(),
    })
}

fn classify<E>(err: SdkError<E, HttpResponse>, key: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = status_of(&err);
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return StoreError::Unavailable(error_chain(&err));
        }
        SdkError::ConstructionFailure(_) => return StoreError::Other(error_chain(&err)),
        _ => {}
    }
    let code = err.code().unwrap_or("").to_string();
    let message = err.message().unwrap_or("").to_string();
    let what = if message.is_empty() {
        format!("{code} (HTTP {})", status.unwrap_or(0))
    } else {
        format!("{code}: {message} (HTTP {})", status.unwrap_or(0))
    };
    match (status, code.as_str()) {
        (_, "NoSuchBucket") => StoreError::NoSuchBucket(what),
        (Some(404), _) | (_, "NoSuchKey") | (_, "NotFound") => {
            StoreError::NotFound(key.to_string())
        }
        (Some(412), _) | (_, "PreconditionFailed") => {
            StoreError::PreconditionFailed(key.to_string())
        }
        (Some(416), _) => StoreError::InvalidRange(key.to_string()),
        (Some(401 | 403), _)
        | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            StoreError::AccessDenied(what)
        }
        (Some(s), _) if s >= 500 => StoreError::Unavailable(what),
        _ => StoreError::Other(what),
    }
}

/// An error and its sources, each message once: "dispatch failure: tcp connect error: ...".
pub(super) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// A Last-Modified as a time, in whole seconds. HEAD gives it as an HTTP date (seconds) and
/// ListObjectsV2 with milliseconds: cut to seconds, both agree, so a file's mtime does not
/// change when it is opened, which would make the kernel drop its cached pages.
pub(super) fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| u64::try_from(t.secs()).ok())
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn separate(self: Arc<Self>) -> Arc<dyn ObjectStore> {
        // A client of its own: the configuration and credentials chain loaded again, which
        // gives it its own HTTP client and connection pool.
        Arc::new(S3Store::connect(&self.opts).await)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        if let Some(direct) = &self.direct {
            return direct.head(key).await;
        }
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or_default().to_string(),
            last_modified: to_system_time(out.last_modified()),
            content_type: out.content_type().map(str::to_string),
            metadata: out
                .metadata()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let pieces = self
            .get_range_pieces(
                key,
                range.clone(),
                if_match,
                (range.end - range.start) as usize,
            )
            .await?;
        Ok(pieces.into_iter().next().unwrap_or_default())
    }

    async fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
        piece: usize,
    ) -> StoreResult<Vec<Bytes>> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        // The SDK retries sending the request; a body that breaks off is retried here.
        let mut attempt = 1;
        loop {
            match self.get_once(key, &range, if_match, piece.max(1)).await {
                Err(StoreError::Unavailable(msg)) if attempt < self.max_attempts => {
                    debug!(key, attempt, "GET failed, retrying: {msg}");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        headers: &WriteHeaders,
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        let (if_match, if_none_match) = conditions(expect);
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .body(ByteStream::from(body))
            .set_content_type(headers.content_type.clone())
            .set_metadata(Some(headers.metadata.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    async fn copy(
        &self,
        src_key: &str,
        dst_key: &str,
        src_if_match: Option<&str>,
        headers: &WriteHeaders,
    ) -> StoreResult<String> {
        let out = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(dst_key)
            .copy_source(copy_source(&self.bucket, src_key))
            .set_copy_source_if_match(src_if_match.map(str::to_string))
            .metadata_directive(MetadataDirective::Replace)
            .set_content_type(headers.content_type.clone())
            .set_metadata(Some(headers.metadata.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| classify(e, src_key))?;
        Ok(out
            .copy_object_result()
            .and_then(|r| r.e_tag())
            .unwrap_or_default()
            .to_string())
    }

    async fn create_multipart(&self, key: &str, headers: &WriteHeaders) -> StoreResult<String> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_content_type(headers.content_type.clone())
            .set_metadata(Some(headers.metadata.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Other(format!("no upload id for {key}")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<String> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src_key: &str,
        range: Range<u64>,
        src_if_match: Option<&str>,
    ) -> StoreResult<String> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(copy_source(&self.bucket, src_key))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(src_if_match.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify(e, src_key))?;
        Ok(out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .unwrap_or_default()
            .to_string())
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        let (if_match, if_none_match) = conditions(expect);
        let parts = parts
            .iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(&p.etag)
                    .build()
            })
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(e, key))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify(e, key) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| classify(e, &keys[0]))?;
        match out.errors().first() {
            Some(e) => Err(StoreError::Other(format!(
                "delete of {} failed: {} {}",
                e.key().unwrap_or_default(),
                e.code().unwrap_or_default(),
                e.message().unwrap_or_default()
            ))),
            None => Ok(()),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(token.map(str::to_string))
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| classify(e, prefix))?;
        Ok(ListPage {
            objects: out
                .contents()
                .iter()
                .map(|o| ListedObject {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_string(),
                    last_modified: to_system_time(o.last_modified()),
                })
                .collect(),
            prefixes: out
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_string))
                .collect(),
            next_token: if out.is_truncated().unwrap_or(false) {
                out.next_continuation_token().map(str::to_string)
            } else {
                None
            },
        })
    }
}

/// `x-amz-copy-source`: bucket and key, the key percent-encoded except for `/`.
/// The `If-Match` and `If-None-Match` headers of a conditional write.
fn conditions(expect: Expect<'_>) -> (Option<String>, Option<String>) {
    match expect {
        Expect::Any => (None, None),
        Expect::Absent => (None, Some("*".to_string())),
        Expect::ETag(etag) => (Some(etag.to_string()), None),
    }
}

fn copy_source(bucket: &str, key: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "{bucket}/{}",
        percent_encoding::utf8_percent_encode(key, KEEP)
    )
}

#[cfg(test)]
mod tests {
    use super::{copy_source, direct_target};

    #[test]
    fn copy_source_encodes_everything_but_slashes() {
        assert_eq!(copy_source("b", "a b/c+d%"), "b/a%20b/c%2Bd%25");
        assert_eq!(copy_source("b", "été/x"), "b/%C3%A9t%C3%A9/x");
    }

    #[test]
    fn a_presigned_head_tells_where_heads_go_and_how_they_are_signed() {
        let path_style = "http://127.0.0.1:3900/b/s3bridge-endpoint-probe?X-Amz-Algorithm=AWS4-HMAC-SHA256\
            &X-Amz-Credential=GK1%2F20261202%2Fgarage%2Fs3%2Faws4_request&X-Amz-Date=20261202T000000Z";
        let t = direct_target(path_style, "s3bridge-endpoint-probe").unwrap();
        assert_eq!(t.bucket_url, "http://127.0.0.1:3900/b");
        assert_eq!(t.signing_region, "garage");
        let hosted = "https://b.s3.eu-west-1.amazonaws.com/s3bridge-endpoint-probe?x-id=HeadObject\
            &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261202%2Feu-west-1%2Fs3%2Faws4_request";
        let t = direct_target(hosted, "s3bridge-endpoint-probe").unwrap();
        assert_eq!(t.bucket_url, "https://b.s3.eu-west-1.amazonaws.com");
        assert_eq!(t.signing_region, "eu-west-1");
        let sigv4a = "https://b.s3.amazonaws.com/s3bridge-endpoint-probe?X-Amz-Algorithm=AWS4-ECDSA-P256-SHA256\
            &X-Amz-Credential=AKIA%2F20261202%2Fs3%2Faws4_request";
        assert!(direct_target(sigv4a, "s3bridge-endpoint-probe").is_none());
        let express = "https://b--x-s3.s3express.amazonaws.com/s3bridge-endpoint-probe?X-Amz-Algorithm=AWS4-HMAC-SHA256\
            &X-Amz-Credential=AKIA%2F20261202%2Fus-east-1%2Fs3express%2Faws4_request";
        assert!(direct_target(express, "s3bridge-endpoint-probe").is_none());
    }
}
