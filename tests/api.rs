//! The OCI pull API over real sockets against the real upstream: status codes, OCI error codes,
//! headers, HEAD, Range and tag-list pagination.

mod common;

use common::fake::{Fake, Scripted};
use common::{http_get, request, require_tools, Fixture, Gantry, ACCEPT_ALL};
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_oci_error_and_gantry_keeps_serving() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let long_tag = "t".repeat(300);
    let cases: Vec<(Method, String, StatusCode, &str)> = vec![
        (
            Method::GET,
            "/v2/../x/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/test/../../etc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/%2e%2e/x/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/Test/Multi/manifests/v1".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/test/multi/blobs/sha256:xyz".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/test/multi/blobs/sha256:..%2f..%2fetc".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/test/multi/manifests/sha256:ABC".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("/v2/test/multi/manifests/{long_tag}"),
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            Method::GET,
            "/v2/test/multi/manifests/nope".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            format!("/v2/test/multi/blobs/sha256:{}", "0".repeat(64)),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/test/multi/manifests/v1?ns=evil.example".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/evil.example/x/manifests/v1".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            Method::PUT,
            "/v2/test/multi/manifests/v1".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            "/v2/test/multi/manifests/v1".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/test/multi/blobs/uploads/".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::PATCH,
            "/v2/test/multi/blobs/uploads/abc".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::PUT,
            "/v2/test/multi/blobs/uploads/abc".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("/v2/test/multi/blobs/{}", fixture.multi.layers[0].0),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in &cases {
        let reply = request(method.clone(), &gantry.url(path), &[])
            .await
            .unwrap();
        assert_eq!(reply.status, *status, "{method} {path}: {:?}", reply.body);
        assert_eq!(
            reply.error_code().as_deref(),
            Some(*code),
            "{method} {path}"
        );
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
    }
    // Nothing outside /v2/ is routed at all.
    let reply = http_get(&gantry.url("/etc/passwd"), &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // Only the two valid requests for things the upstream lacks were asked of it, as sent; none
    // of the invalid ones, refused ones or ones for another registry reached it.
    let reached: Vec<(Method, String)> = fixture
        .proxy
        .seen()
        .into_iter()
        .map(|seen| (seen.method, seen.path))
        .collect();
    assert_eq!(
        reached,
        [
            (Method::GET, "/v2/test/multi/manifests/nope".to_owned()),
            (
                Method::GET,
                format!("/v2/test/multi/blobs/sha256:{}", "0".repeat(64))
            ),
        ]
    );
    // And gantry still serves.
    let ok = http_get(
        &gantry.url("/v2/test/multi/manifests/v1"),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_head_and_range_answers() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;

    let base = http_get(&gantry.url("/v2/"), &[]).await.unwrap();
    assert_eq!(base.status, StatusCode::OK);
    assert_eq!(
        base.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(&base.body[..], b"{}");

    let manifest_path = "/v2/test/multi/manifests/v1";
    let head = request(
        Method::HEAD,
        &gantry.url(manifest_path),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(fixture.multi.manifest_digest.as_str())
    );
    assert_eq!(
        head.header("content-length"),
        Some(fixture.multi.manifest_size.to_string().as_str())
    );
    assert_eq!(
        head.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert!(head.body.is_empty());
    let get = http_get(&gantry.url(manifest_path), &[("accept", ACCEPT_ALL)])
        .await
        .unwrap();
    assert_eq!(get.body.len(), fixture.multi.manifest_size);
    let etag = get.header("etag").unwrap().to_owned();
    let not_modified = http_get(
        &gantry.url(manifest_path),
        &[("accept", ACCEPT_ALL), ("if-none-match", &etag)],
    )
    .await
    .unwrap();
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);

    // A blob, cold then warm: Range answers equal the bytes of the whole blob.
    let (digest, size) = fixture.multi.layers[1].clone();
    let blob_path = format!("/v2/test/multi/blobs/{digest}");
    let cold_range = http_get(&gantry.url(&blob_path), &[("range", "bytes=100-199")])
        .await
        .unwrap();
    let whole = http_get(&gantry.url(&blob_path), &[]).await.unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len() as u64, size);
    assert_eq!(whole.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(cold_range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&cold_range.body[..], &whole.body[100..200]);
    let cases = [
        ("bytes=0-0", 0, 1),
        ("bytes=1000-", 1000, size as usize),
        ("bytes=-4096", size as usize - 4096, size as usize),
        ("bytes=1048570-1048600", 1_048_570, 1_048_601),
    ];
    for (range, start, end) in cases {
        let reply = http_get(&gantry.url(&blob_path), &[("range", range)])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            reply.header("content-range"),
            Some(format!("bytes {start}-{}/{size}", end - 1).as_str()),
            "{range}"
        );
        assert_eq!(&reply.body[..], &whole.body[start..end], "{range}");
    }
    let unsatisfiable = http_get(
        &gantry.url(&blob_path),
        &[("range", &format!("bytes={size}-"))],
    )
    .await
    .unwrap();
    assert_eq!(unsatisfiable.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(unsatisfiable.error_code().as_deref(), Some("RANGE_INVALID"));
    assert_eq!(
        unsatisfiable.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    let head_blob = request(Method::HEAD, &gantry.url(&blob_path), &[])
        .await
        .unwrap();
    assert_eq!(
        head_blob.header("content-length"),
        Some(size.to_string().as_str())
    );
    // The blob crossed the upstream link once for all of the above.
    assert_eq!(fixture.proxy.blob_gets().get(&digest), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_pass_through() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    common::skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}/test/multi:v1", fixture.registry.host()),
        &format!("docker://{}/test/multi:v2", fixture.registry.host()),
    ])
    .await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let list = http_get(&gantry.url("/v2/test/multi/tags/list"), &[])
        .await
        .unwrap();
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json()["name"], "test/multi");
    assert_eq!(list.json()["tags"], serde_json::json!(["v1", "v2"]));
    let unknown = http_get(&gantry.url("/v2/test/nothing/tags/list"), &[])
        .await
        .unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code().as_deref(), Some("NAME_UNKNOWN"));
}

/// distribution 2.8 does not paginate tag lists, so a scripted upstream plays one that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_pages_point_back_at_gantry() {
    let upstream = Fake::start(|seen| {
        let tags = match seen.query_param("last").as_deref() {
            None => vec!["a", "b"],
            _ => vec!["c"],
        };
        let mut reply = Scripted::json(
            StatusCode::OK,
            serde_json::json!({"name": "team/app", "tags": tags}),
        );
        if seen.query_param("last").is_none() {
            reply = reply.header("link", r#"</v2/team/app/tags/list?last=b&n=2>; rel="next""#);
        }
        reply
    })
    .await;
    let gantry = Gantry::start(&upstream.url()).await;

    let page = http_get(&gantry.url("/v2/team/app/tags/list?n=2"), &[])
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        page.header("link"),
        Some(r#"</v2/team/app/tags/list?last=b&n=2>; rel="next""#)
    );
    assert!(
        upstream.seen()[0]
            .uri
            .ends_with("/v2/team/app/tags/list?n=2"),
        "{:?}",
        upstream.seen()
    );

    // Addressed by path prefix or ns=, the link keeps the client's form.
    let host = upstream.addr.to_string();
    let prefixed = http_get(
        &gantry.url(&format!("/v2/{host}/team/app/tags/list?n=2")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        prefixed.header("link"),
        Some(format!(r#"</v2/{host}/team/app/tags/list?last=b&n=2>; rel="next""#).as_str())
    );
    let with_ns = http_get(
        &gantry.url(&format!("/v2/team/app/tags/list?n=2&ns={host}")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(with_ns.header("oci-namespace"), Some(host.as_str()));
    assert_eq!(
        with_ns.header("link"),
        Some(format!(r#"</v2/team/app/tags/list?last=b&n=2&ns={host}>; rel="next""#).as_str())
    );
    let next = http_get(&gantry.url("/v2/team/app/tags/list?last=b&n=2"), &[])
        .await
        .unwrap();
    assert_eq!(next.json()["tags"], serde_json::json!(["c"]));
    assert!(next.header("link").is_none());
}
