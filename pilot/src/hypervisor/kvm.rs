//! STUB: the `kvm` driver (being written).

use super::{Dom0Memory, Domain, HvError, HvOptions, Hypervisor};
use protocol::pilot::VmLaunch;
use serde::{Deserialize, Serialize};

/// `[kvm]` section of the node config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvmConfig {}

pub struct Kvm;

impl Kvm {
    pub fn open(_cfg: &KvmConfig, _opts: &HvOptions) -> Result<Self, HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        "kvm"
    }
    fn dom0_memory(&self) -> Result<Dom0Memory, HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
    fn set_dom0_target(&self, _mb: u64) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
    fn domains(&self) -> Result<Vec<Domain>, HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
    fn create(&self, _vm: &VmLaunch) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
    fn destroy(&self, _name: &str) -> Result<(), HvError> {
        Err(HvError::NotBuilt { kind: "kvm".into() })
    }
}
