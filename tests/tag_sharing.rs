//! One tag entry whatever the client's Accept: dockerd, containerd and skopeo (each with the exact
//! Accept headers it sends when resolving a tag) pulling one tag cost the upstream one manifest
//! GET inside the TTL and one HEAD after it; a client whose Accept excludes what the shared entry
//! holds gets its own upstream answer under its own key, and forgetting the tag drops both.
//! Against the real docker-registry behind the counting pass-through.

mod common;

use std::time::Duration;

use common::{http_get, request, require_tools, skopeo, Fixture, Gantry, Options};
use http::{Method, StatusCode};

/// dockerd (moby's distribution client): one header per type.
const DOCKERD: &[(&str, &str)] = &[
    (
        "accept",
        "application/vnd.docker.distribution.manifest.v2+json",
    ),
    (
        "accept",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ),
    ("accept", "application/vnd.oci.image.index.v1+json"),
    ("accept", "application/vnd.oci.image.manifest.v1+json"),
];
/// containerd's resolver: one list, ending in `*/*`.
const CONTAINERD: &[(&str, &str)] = &[(
    "accept",
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
)];
/// skopeo (containers/image): schema 1 types as well.
const SKOPEO: &[(&str, &str)] = &[(
    "accept",
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json",
)];
const CLIENTS: [(&str, &[(&str, &str)]); 3] = [
    ("dockerd", DOCKERD),
    ("containerd", CONTAINERD),
    ("skopeo", SKOPEO),
];

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const TTL: Duration = Duration::from_secs(2);

async fn get_tag(gantry: &Gantry, repo: &str, tag: &str, accept: &[(&str, &str)]) -> common::Reply {
    let url = gantry.url(&format!("/v2/{repo}/manifests/{tag}"));
    request(Method::GET, &url, accept).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_client_types_cost_one_get_inside_the_ttl_and_one_head_after_it() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            ttl: "2s",
            ..Options::default()
        },
    )
    .await;
    let index_path = "/manifests/idx";
    for (name, accept) in CLIENTS {
        let reply = get_tag(&gantry, "test/index", "idx", accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {:?}", reply.body);
        assert_eq!(
            reply.header("docker-content-digest"),
            Some(fixture.index_digest.as_str()),
            "{name}"
        );
        assert_eq!(reply.header("content-type"), Some(OCI_INDEX), "{name}");
    }
    // A narrower client whose Accept admits the shared entry's type is answered from it too.
    let narrow = get_tag(&gantry, "test/index", "idx", &[("accept", OCI_INDEX)]).await;
    assert_eq!(
        narrow.header("docker-content-digest"),
        Some(fixture.index_digest.as_str())
    );
    assert_eq!(
        fixture.proxy.count(&Method::GET, index_path),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
    assert_eq!(fixture.proxy.count(&Method::HEAD, index_path), 0);

    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    fixture.proxy.clear();
    for (name, accept) in CLIENTS {
        let reply = get_tag(&gantry, "test/index", "idx", accept).await;
        assert_eq!(
            reply.header("docker-content-digest"),
            Some(fixture.index_digest.as_str()),
            "{name} after the TTL"
        );
    }
    assert_eq!(
        fixture.proxy.count(&Method::HEAD, index_path),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
    assert_eq!(fixture.proxy.count(&Method::GET, index_path), 0);
    gantry.stop().await;
}

/// The tag is a docker manifest list: a client taking only docker schema 2 image manifests is
/// answered by the upstream with the linux/amd64 manifest, which gantry must fetch for it and
/// never answer with the list; the full clients keep the list; forgetting the tag (what a purge
/// does) drops both entries, so both kinds of client ask the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_shared_entry_does_not_suit_gets_its_own_answer_and_forget_drops_both() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let upstream = fixture.registry.host();
    skopeo(&[
        "copy",
        "--all",
        "--format",
        "v2s2",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{upstream}/test/index:idx"),
        &format!("docker://{upstream}/test/list:v1"),
    ])
    .await;
    let direct = |accept: &'static str| {
        let url = format!("http://{upstream}/v2/test/list/manifests/v1");
        async move { http_get(&url, &[("accept", accept)]).await.unwrap() }
    };
    let list = direct(DOCKER_LIST).await;
    let amd64 = direct(DOCKER_MANIFEST).await;
    assert_eq!(list.header("content-type"), Some(DOCKER_LIST));
    assert_eq!(amd64.header("content-type"), Some(DOCKER_MANIFEST));

    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let gets = || fixture.proxy.count(&Method::GET, "/manifests/v1");
    let only_v2: &[(&str, &str)] = &[("accept", DOCKER_MANIFEST)];
    for round in ["miss", "hit"] {
        for (name, accept) in CLIENTS {
            let reply = get_tag(&gantry, "test/list", "v1", accept).await;
            assert_eq!(reply.status, StatusCode::OK, "{name} ({round})");
            assert_eq!(reply.header("content-type"), Some(DOCKER_LIST), "{name}");
            assert_eq!(reply.body, list.body, "{name} ({round})");
        }
        let reply = get_tag(&gantry, "test/list", "v1", only_v2).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.header("content-type"), Some(DOCKER_MANIFEST));
        assert_eq!(
            reply.header("docker-content-digest"),
            amd64.header("docker-content-digest")
        );
        assert_eq!(reply.body, amd64.body);
        assert_eq!(
            gets(),
            2,
            "one GET for the shared entry, one for docker v2 only ({round})"
        );
    }

    let mirror = &gantry.running.as_ref().unwrap().mirror;
    let target = mirror.resolve(None, "test/list").unwrap();
    mirror
        .forget_tag(target.registry.upstream.name(), target.repo.as_str(), "v1")
        .await;
    fixture.proxy.clear();
    let reply = get_tag(&gantry, "test/list", "v1", DOCKERD).await;
    assert_eq!(reply.header("content-type"), Some(DOCKER_LIST));
    assert_eq!(gets(), 1, "the shared entry was dropped");
    let reply = get_tag(&gantry, "test/list", "v1", only_v2).await;
    assert_eq!(reply.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(gets(), 2, "the docker v2 entry was dropped");
    gantry.stop().await;
}
