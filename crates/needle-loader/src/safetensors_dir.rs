//! A Hugging Face checkpoint folder: `config.json`, safetensors weights (one file or shards
//! listed in `model.safetensors.index.json`), `tokenizer.json`, optional `generation_config.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::Metadata};
use serde::Deserialize;

use crate::config::OneOrMany;
use crate::{Error, HostTensor, LlamaConfig, Result, Tokenizer};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Start of the data section (8-byte length + JSON header).
    data_start: usize,
    meta: Metadata,
}

/// An opened safetensors checkpoint folder.
pub struct SafetensorsDir {
    dir: PathBuf,
    config: LlamaConfig,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: OneOrMany,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), source: e })
}

impl SafetensorsDir {
    /// Opens the folder: parses and validates `config.json` (eos ids merged with
    /// `generation_config.json`), maps every shard and checks its header.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::NotACheckpoint { path: dir.into(), reason: "folder has no config.json".into() });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut config = LlamaConfig::from_hf_json(&text, &config_path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let g: GenerationConfig = read_json(&gen_path)?;
            for id in g.eos_token_id.into_vec() {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
            config.validate()?;
        }

        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.is_file() {
            let idx: ShardIndex = read_json(&index_path)?;
            let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".into()]
        } else {
            return Err(Error::NotACheckpoint {
                path: dir.into(),
                reason: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for name in files {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map owned by this struct; the file must not change while open.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::Safetensors { path: path.clone(), reason: e.to_string() })?;
            for tname in meta.tensors().keys() {
                if index.insert(tname.clone(), shards.len()).is_some() {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor {tname:?} appears in two shards"),
                    });
                }
            }
            shards.push(Shard { path, map, data_start: 8 + n, meta });
        }
        tracing::debug!(dir = %dir.display(), shards = shards.len(), tensors = index.len(), "opened safetensors folder");
        Ok(Self { dir: dir.into(), config, shards, index })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The validated config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Number of weight files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Number of tensors over all shards.
    pub fn tensor_count(&self) -> usize {
        self.index.len()
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Tensor counts per dtype, e.g. `BF16 ×272`.
    pub fn type_summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for s in &self.shards {
            for info in s.meta.tensors().values() {
                *counts.entry(format!("{:?}", info.dtype)).or_default() += 1;
            }
        }
        counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect::<Vec<_>>().join(", ")
    }

    /// A tensor converted to f32 (F32, F16, BF16 are supported).
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), tensor: name.into() })?;
        let info = shard
            .meta
            .info(name)
            .ok_or_else(|| Error::MissingTensor { path: shard.path.clone(), tensor: name.into() })?;
        let (start, end) = info.data_offsets;
        // read_metadata validated the offsets against the file, but stay defensive.
        let bytes = shard.map.get(shard.data_start + start..shard.data_start + end).ok_or_else(|| {
            Error::TensorDataOutOfBounds {
                path: shard.path.clone(),
                tensor: name.into(),
                offset: (shard.data_start + start) as u64,
                size: end.saturating_sub(start) as u64,
                file_len: shard.map.len() as u64,
            }
        })?;
        let n: usize = info.shape.iter().product();
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::UnsupportedTensorType {
                    path: shard.path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                    supported: "F32, F16, BF16",
                });
            }
        };
        if data.len() != n {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                reason: format!("tensor {name:?}: {} bytes for shape {:?}", bytes.len(), info.shape),
            });
        }
        crate::check_finite(&shard.path, name, &data)?;
        Ok(HostTensor { shape: info.shape.clone(), data })
    }

    /// `tokenizer.json` from the folder, with the config's eos ids and the chat template of
    /// `tokenizer_config.json` when it has one.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let tok = Tokenizer::from_file(
            &self.dir.join("tokenizer.json"),
            self.config.bos_token_id,
            self.config.eos_token_ids.clone(),
        )?;
        Ok(tok.with_chat_template(self.chat_template()?))
    }

    /// The chat template of `tokenizer_config.json`, if the folder has one.
    pub fn chat_template(&self) -> Result<Option<crate::ChatTemplate>> {
        crate::ChatTemplate::from_tokenizer_config(&self.dir.join("tokenizer_config.json"))
    }
}
