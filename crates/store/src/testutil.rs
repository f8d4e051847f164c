//! The contract every store must meet, run against each kind in its own tests.

use bytes::Bytes;
use cairn_core::{stream, Code, DigestFunction, Error};
use futures::StreamExt;

use crate::{Store, StoreExt};

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u8) -> Bytes {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Put, has, get (whole and ranged), missing keys, an aborted put, and the empty blob.
pub async fn check_store_contract(store: &dyn Store) {
    let f = DigestFunction::Sha256;
    let small = data(1000, 1);
    let big = data(300_000, 2);
    let ds = f.compute(&small);
    let db = f.compute(&big);
    let missing = f.compute(b"missing");

    store.put_bytes(&ds, small.clone()).await.unwrap();
    store.put(&db, stream::once(big.clone())).await.unwrap();
    let sizes = store.has_many(&[ds, missing, db]).await.unwrap();
    assert_eq!(sizes, vec![Some(1000), None, Some(300_000)]);

    assert_eq!(store.get_all(&ds, usize::MAX).await.unwrap(), small);
    assert_eq!(store.get_all(&db, usize::MAX).await.unwrap(), big);

    let part = stream::collect(
        store.get(&db, 100_000, Some(70_000)).await.unwrap(),
        usize::MAX,
    )
    .await
    .unwrap();
    assert_eq!(part, big.slice(100_000..170_000));
    let tail = stream::collect(store.get(&db, 299_990, None).await.unwrap(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(tail, big.slice(299_990..));
    let end = stream::collect(store.get(&db, 300_000, None).await.unwrap(), usize::MAX)
        .await
        .unwrap();
    assert!(end.is_empty());
    let err = store.get(&db, 300_001, None).await.err().unwrap();
    assert_eq!(err.code, Code::OutOfRange, "{err}");

    let err = store.get(&missing, 0, None).await.err().unwrap();
    assert_eq!(err.code, Code::NotFound, "{err}");

    // A body that fails midway leaves nothing visible.
    let aborted = f.compute(b"aborted-body");
    let body = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"aborted-")),
        Err(Error::cancelled("client went away")),
    ])
    .boxed();
    assert!(store.put(&aborted, body).await.is_err());
    assert_eq!(store.has(&aborted).await.unwrap(), None);

    let empty = f.empty_digest();
    store.put_bytes(&empty, Bytes::new()).await.unwrap();
    assert_eq!(store.get_all(&empty, 10).await.unwrap(), Bytes::new());
}
