//! The Garage harness itself (tests/common/garage.rs): a real S3-compatible server comes up on
//! loopback with a bucket and known credentials, stores, lists and returns objects, survives a
//! kill and restart with its data, and takes a second bucket. The object tier's tests build on
//! each of these.

mod common;

use common::garage::Garage;

#[tokio::test(flavor = "multi_thread")]
async fn garage_stores_lists_and_restarts_with_its_data() {
    let Some(mut garage) = Garage::start().await else {
        return;
    };
    assert_eq!(
        garage.list("").await,
        Vec::<String>::new(),
        "a fresh bucket"
    );
    assert_eq!(garage.object("blobs/sha256/none").await, None);

    garage
        .put_object("blobs/sha256/aa", b"first".to_vec())
        .await;
    garage
        .put_object("blobs/sha256/bb", b"second".to_vec())
        .await;
    garage.put_object("manifests/cc", b"third".to_vec()).await;
    assert_eq!(
        garage.object("blobs/sha256/aa").await.as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        garage.list("blobs").await,
        ["blobs/sha256/aa", "blobs/sha256/bb"],
        "a prefix lists only what is under it"
    );
    assert_eq!(garage.list("").await.len(), 3);

    garage.kill().await;
    let down = garage
        .store()
        .head(&object_store::path::Path::from("blobs/sha256/aa"))
        .await;
    assert!(down.is_err(), "a killed Garage answers nothing: {down:?}");

    garage.restart().await;
    assert_eq!(
        garage.object("blobs/sha256/bb").await.as_deref(),
        Some(&b"second"[..]),
        "data survives a restart on the same ports"
    );

    garage.delete_object("blobs/sha256/bb").await;
    assert_eq!(garage.object("blobs/sha256/bb").await, None);

    assert_eq!(
        garage.yaml(),
        format!(
            "  s3:\n    endpoint: http://127.0.0.1:{}\n    bucket: gantry\n    region: garage\n    access_key_id: {}\n    secret_access_key: {}\n    allow_http: true\n",
            garage.s3_port, garage.key_id, garage.secret
        ),
        "the `storage:` lines, in the contract's names"
    );

    garage.create_bucket("other").await;
    use object_store::ObjectStore as _;
    garage
        .store_for("other")
        .put(&"k".into(), b"in other".to_vec().into())
        .await
        .unwrap();
    assert_eq!(garage.list("").await.len(), 2, "buckets are separate");
}
