//! The warm pools the gateway serves, one per image, by name. They share
//! one memory budget (`pool.max_memory_mb`); each has its own sizer,
//! template and sessions. A request names its image (or gets the default
//! one); a session stays on the image its first call chose.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ember_pool::pool::{Backend, Pool};

use crate::error::Error;

/// See [`Pools::readiness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// These images' pools have not held their `min_size` ready VMs yet.
    Warming(Vec<Warming>),
    Draining,
}

/// One image's pool on its way to its first `min_size` ready VMs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warming {
    pub image: String,
    pub ready: usize,
    pub min_size: usize,
    pub booting: usize,
}

impl std::fmt::Display for Warming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image {}: {} of {} warm VMs ready ({} booting)",
            self.image, self.ready, self.min_size, self.booting
        )
    }
}

pub struct Pools<B: Backend> {
    by_name: Arc<BTreeMap<String, Pool<B>>>,
    default: Arc<str>,
}

impl<B: Backend> Clone for Pools<B> {
    fn clone(&self) -> Self {
        Self { by_name: Arc::clone(&self.by_name), default: Arc::clone(&self.default) }
    }
}

impl<B: Backend> std::fmt::Debug for Pools<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").field("images", &self.names()).field("default", &self.default).finish()
    }
}

impl<B: Backend> Pools<B> {
    /// `by_name` must hold the `default` image's pool.
    pub fn new(by_name: BTreeMap<String, Pool<B>>, default: &str) -> Result<Self, String> {
        if !by_name.contains_key(default) {
            return Err(format!("no pool for the default image {default:?}"));
        }
        Ok(Self { by_name: Arc::new(by_name), default: Arc::from(default) })
    }

    /// One pool serving the default image (tests, single-image setups).
    pub fn single(pool: Pool<B>) -> Self {
        let name = ember_image::DEFAULT_IMAGE;
        Self { by_name: Arc::new(BTreeMap::from([(name.to_string(), pool)])), default: Arc::from(name) }
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn default_pool(&self) -> &Pool<B> {
        match self.by_name.get(&*self.default) {
            Some(p) => p,
            None => unreachable!("Pools::new checked that the default image has a pool"),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Pool<B>)> {
        self.by_name.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The pool of `image` (the default one when `None`), or the 400 that
    /// names the images there are.
    pub fn get(&self, image: Option<&str>) -> Result<(&str, &Pool<B>), Error> {
        let name = image.unwrap_or(&self.default);
        self.by_name.get_key_value(name).map(|(k, v)| (k.as_str(), v)).ok_or_else(|| {
            Error::bad_request_code(
                "unknown_image",
                format!("unknown image {name:?}; known images: {}", self.names().join(", ")),
            )
        })
    }

    /// The image and pool that hold session `key`, if one does.
    pub fn with_session(&self, key: &str) -> Option<(&str, &Pool<B>)> {
        self.iter().find(|(_, p)| p.has_session(key))
    }

    /// Whether every pool has held its `min_size` ready VMs once (and none
    /// drains): what `GET /readyz` and the ready line say.
    pub fn readiness(&self) -> Readiness {
        let mut waiting = Vec::new();
        for (image, pool) in self.iter() {
            let s = pool.status();
            if s.draining {
                return Readiness::Draining;
            }
            if !s.warmed_up {
                let min_size = pool.config().min_size;
                waiting.push(Warming {
                    image: image.to_string(),
                    ready: s.ready,
                    min_size,
                    booting: s.booting,
                });
            }
        }
        if waiting.is_empty() {
            Readiness::Ready
        } else {
            Readiness::Warming(waiting)
        }
    }

    /// The longest drain any pool allows.
    pub fn drain_timeout(&self) -> Duration {
        self.by_name.values().map(|p| p.config().drain_timeout).max().unwrap_or_default()
    }

    /// Shut every pool down, at once.
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.by_name.values().cloned().collect();
        let tasks: Vec<_> =
            all.into_iter().map(|p| tokio::spawn(async move { p.shutdown().await })).collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}
