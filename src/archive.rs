//! Where archived images are kept: one interface over a local folder, S3-compatible object
//! storage, or memory, all through the `object_store` crate.

use crate::config::{ArchiveBackend, ArchiveSettings};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("archive storage: {0}")]
    Setup(String),
    #[error("no such object in the archive")]
    NotFound,
}

/// A handle to the archive; cheap to clone.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// An archived object being read.
pub struct Object {
    pub size: u64,
    pub bytes: BoxStream<'static, Result<Bytes, ArchiveError>>,
}

impl Archive {
    pub fn from_settings(s: &ArchiveSettings) -> Result<Archive, ArchiveError> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match s.backend {
            ArchiveBackend::Memory => (
                Arc::new(object_store::memory::InMemory::new()),
                String::new(),
            ),
            ArchiveBackend::Local => {
                std::fs::create_dir_all(&s.path).map_err(|e| {
                    ArchiveError::Setup(format!("cannot create archive folder {}: {e}", s.path))
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&s.path)?;
                (Arc::new(fs), String::new())
            }
            ArchiveBackend::S3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&s.s3_bucket)
                    .with_region(&s.s3_region)
                    .with_allow_http(s.s3_allow_http);
                if !s.s3_endpoint.is_empty() {
                    b = b.with_endpoint(&s.s3_endpoint);
                }
                if !s.s3_access_key_id.is_empty() {
                    b = b
                        .with_access_key_id(s.s3_access_key_id.expose())
                        .with_secret_access_key(s.s3_secret_access_key.expose());
                }
                let prefix = s.s3_prefix.trim_matches('/').to_owned();
                (Arc::new(b.build()?), prefix)
            }
        };
        Ok(Archive { store, prefix })
    }

    /// An archive kept in memory (tests, trials).
    pub fn in_memory() -> Archive {
        Archive {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: String::new(),
        }
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Writes `bytes` at `key`, replacing what is there (writes are whole-object: a reader sees
    /// the old object or the new one, never a part).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ArchiveError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Object, ArchiveError> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => Ok(Object {
                size: r.meta.size,
                bytes: r
                    .into_stream()
                    .map(|c| c.map_err(ArchiveError::from))
                    .boxed(),
            }),
            Err(object_store::Error::NotFound { .. }) => Err(ArchiveError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `key`; an object that is already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Keys of every object under `dir` (tests count copies with it).
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ArchiveError> {
        let prefix = self.path(dir);
        let mut keys = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            keys.push(meta?.location.to_string());
        }
        Ok(keys)
    }
}
