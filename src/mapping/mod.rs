//! Field mapping (interface; implementation lands with the mapping module).
use std::collections::BTreeSet;
use std::path::Path;

use crate::config::{LinkConfig, RolloutConfig};
use crate::model::{Fields, Value};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

pub struct LinkMapping;
impl LinkMapping {
    pub fn compile(_link: &LinkConfig) -> Result<LinkMapping, MappingError> { todo!() }
    pub fn inbound(&self, _record: &serde_json::Map<String, Value>) -> Result<Fields, MappingError> { todo!() }
    pub fn outbound(&self, _values: &Fields, _only: Option<&BTreeSet<String>>) -> Result<serde_json::Map<String, Value>, MappingError> { todo!() }
    pub fn inbound_fields(&self) -> BTreeSet<String> { todo!() }
    pub fn outbound_fields(&self) -> BTreeSet<String> { todo!() }
}
pub struct EntitySchema;
impl EntitySchema {
    pub fn load(_path: &Path) -> Result<EntitySchema, SchemaError> { todo!() }
    pub fn validate(&self, _fields: &Fields) -> Result<(), Vec<String>> { todo!() }
    pub fn property_format(&self, _name: &str) -> Option<String> { todo!() }
}
pub fn normalise_key(_value: &Value, _format: Option<&str>) -> Option<String> { todo!() }
pub fn in_rollout(_rollout: &RolloutConfig, _key: Option<&str>) -> bool { todo!() }
