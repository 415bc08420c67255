//! The CA currently serving: one bundle behind an `Arc`, swapped whole on reload,
//! so the request path clones a pointer and never waits for a reload.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::ca::CaBundle;

/// The CA currently serving; `None` until a bundle is loaded. Swapped whole on reload.
#[derive(Debug, Default)]
pub struct Current {
    bundle: ArcSwapOption<CaBundle>,
}

impl Current {
    pub fn new(bundle: Option<CaBundle>) -> Self {
        Current {
            bundle: ArcSwapOption::from(bundle.map(Arc::new)),
        }
    }

    pub fn current(&self) -> Option<Arc<CaBundle>> {
        self.bundle.load_full()
    }

    pub fn replace(&self, bundle: CaBundle) {
        self.bundle.store(Some(Arc::new(bundle)));
    }
}
