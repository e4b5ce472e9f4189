//! The node image cache against a real HTTP server on 127.0.0.1: two
//! pilots' caches (separate `ImageCache`s on one directory, as two pilot
//! processes would open it) staging the same image at once make exactly one
//! download; a corrupted body is refused with a clear error and never cached.

use pilot::images::{sha256_hex, ImageCache, ImagesConfig};
use protocol::pilot::ImageSource;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

async fn serve(body: Vec<u8>, hits: Arc<AtomicUsize>) -> String {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/img.raw",
        get(move || {
            let body = body.clone();
            let hits = Arc::clone(&hits);
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                // Slow enough that both pilots ask while it is in flight.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                body
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/img.raw")
}

fn cache(dir: &std::path::Path) -> ImageCache {
    ImageCache::open(
        &ImagesConfig {
            cache_dir: dir.display().to_string(),
            max_bytes: 1 << 30,
            download_timeout_s: 30,
            lock_timeout_s: 30,
        },
        "node1",
    )
    .expect("open cache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pilots_staging_one_image_at_once_download_it_once() {
    let body = vec![7u8; 3 << 20];
    let hits = Arc::new(AtomicUsize::new(0));
    let url = serve(body.clone(), Arc::clone(&hits)).await;
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (cache(t.path()), cache(t.path()));
    let src = ImageSource {
        url,
        sha256: Some(sha256_hex(&body)),
    };
    let (ra, rb) = tokio::join!(a.stage(&src), b.stage(&src));
    let (ra, rb) = (ra.expect("pilot a"), rb.expect("pilot b"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the image was downloaded more than once"
    );
    assert_eq!(ra.path, rb.path);
    assert!(ra.hit != rb.hit, "exactly one of them fetched it");
    assert_eq!(std::fs::read(&ra.path).unwrap(), body);
}

#[tokio::test]
async fn a_corrupted_download_is_refused_with_a_clear_error_and_never_cached() {
    let hits = Arc::new(AtomicUsize::new(0));
    let url = serve(b"not the image".to_vec(), Arc::clone(&hits)).await;
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let want = sha256_hex(b"the image");
    let src = ImageSource {
        url: url.clone(),
        sha256: Some(want.clone()),
    };
    let e = c.stage(&src).await.err().expect("a mismatch must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("checksum mismatch") && msg.contains(&want) && msg.contains(&url),
        "{msg}"
    );
    assert!(c.list().is_empty(), "a corrupted image was cached");
    assert_eq!(
        std::fs::read_dir(t.path().join("tmp")).unwrap().count(),
        0,
        "partial file left"
    );
    // Asking again downloads again (nothing bad was remembered).
    assert!(c.stage(&src).await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
