//! The configuration compiled for running: each entity's authority, schema and match
//! keys, each link's mapping, resolved once at start so the hot path looks nothing up
//! by name twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::config::{Config, DeleteConfig, LinkConfig};
use crate::mapping::{EntitySchema, LinkMapping, MappingError, SchemaError};
use crate::merge::EntityPolicy;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("entities.{entity}.schema: cannot load {path}")]
    Schema {
        entity: String,
        path: PathBuf,
        #[source]
        source: SchemaError,
    },
    #[error("links[{index}] ({link}): invalid mapping")]
    Mapping {
        index: usize,
        link: String,
        #[source]
        source: Box<MappingError>,
    },
    #[error("links[{index}]: unknown {what} \"{name}\"")]
    Unknown {
        index: usize,
        what: &'static str,
        name: String,
    },
}

/// One entity, ready to merge.
pub struct EntityRuntime {
    pub name: String,
    pub policy: EntityPolicy,
    pub schema: EntitySchema,
    /// Match-key fields in order, with the schema format used to normalise them.
    pub match_keys: Vec<(String, Option<String>)>,
    pub delete: DeleteConfig,
    /// Indices into [`Runtime::links`].
    pub links: Vec<usize>,
    /// Some link of the entity has a rollout: a change needs its match-key values for
    /// it even when the identity map knows the record.
    pub rollouts: bool,
}

/// One link, ready to map.
pub struct LinkRuntime {
    pub index: usize,
    /// `system.entity`; the checkpoint stream name.
    pub name: String,
    pub config: LinkConfig,
    pub mapping: LinkMapping,
    /// Canonical fields this link writes to its system.
    pub outbound: BTreeSet<String>,
    /// concord captures from this link.
    pub captures: bool,
    /// concord may write to this link's system for this entity.
    pub writes: bool,
}

pub struct Runtime {
    pub config: Config,
    pub entities: BTreeMap<String, EntityRuntime>,
    pub links: Vec<LinkRuntime>,
}

impl Runtime {
    pub fn compile(config: Config) -> Result<Runtime, CompileError> {
        let mut entities = BTreeMap::new();
        for (name, entity) in &config.entities {
            let path = config.base_dir.join(&entity.schema);
            let schema = EntitySchema::load(&path).map_err(|source| CompileError::Schema {
                entity: name.clone(),
                path: path.clone(),
                source,
            })?;
            let match_keys = entity
                .match_keys
                .iter()
                .map(|k| (k.clone(), schema.property_format(k)))
                .collect();
            entities.insert(
                name.clone(),
                EntityRuntime {
                    name: name.clone(),
                    policy: EntityPolicy::from_config(entity),
                    schema,
                    match_keys,
                    delete: entity.delete.clone(),
                    links: Vec::new(),
                    rollouts: false,
                },
            );
        }
        let mut links = Vec::new();
        for (index, link) in config.links.iter().enumerate() {
            let system = config.systems.get(&link.system).ok_or_else(|| CompileError::Unknown {
                index,
                what: "system",
                name: link.system.clone(),
            })?;
            let entity = entities.get_mut(&link.entity).ok_or_else(|| CompileError::Unknown {
                index,
                what: "entity",
                name: link.entity.clone(),
            })?;
            let mapping = LinkMapping::compile(link).map_err(|source| CompileError::Mapping {
                index,
                link: link.name(),
                source: Box::new(source),
            })?;
            entity.links.push(index);
            entity.rollouts |= link.rollout.is_some();
            links.push(LinkRuntime {
                index,
                name: link.name(),
                outbound: mapping.outbound_fields(),
                mapping,
                captures: link.capture.is_some() && system.direction.reads(),
                writes: link.write_mode() != crate::config::WriteMode::ReadOnly && system.direction.writes(),
                config: link.clone(),
            });
        }
        Ok(Runtime {
            config,
            entities,
            links,
        })
    }

    pub fn link(&self, system: &str, entity: &str) -> Option<&LinkRuntime> {
        self.links
            .iter()
            .find(|l| l.config.system == system && l.config.entity == entity)
    }

    /// Systems that receive writes, each once.
    pub fn writing_systems(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .links
            .iter()
            .filter(|l| l.writes)
            .map(|l| l.config.system.as_str())
            .collect();
        set.into_iter().map(String::from).collect()
    }
}
