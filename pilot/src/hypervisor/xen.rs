//! STUB: the `xen` driver (being written).

use super::{Dom0Memory, Domain, HvError, HvOptions, Hypervisor};
use protocol::pilot::VmLaunch;
use serde::{Deserialize, Serialize};

/// `[xen]` section of the node config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XenConfig {}

pub struct Xen;

impl Xen {
    pub fn open(_cfg: &XenConfig, _opts: &HvOptions) -> Result<Self, HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
}

impl Hypervisor for Xen {
    fn name(&self) -> &'static str {
        "xen"
    }
    fn dom0_memory(&self) -> Result<Dom0Memory, HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
    fn set_dom0_target(&self, _mb: u64) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
    fn domains(&self) -> Result<Vec<Domain>, HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
    fn create(&self, _vm: &VmLaunch) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
    fn destroy(&self, _name: &str) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "xen".into() })
    }
}
