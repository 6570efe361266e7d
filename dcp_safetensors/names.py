"""The names of a checkpoint's files, directories and metadata keys, each defined once.

Pure constants, no imports beyond the standard library: the writer, the
reader, the commit protocol and every storage backend take them from here.

Example:
    >>> INDEX_NAME, OBJECTS_FILE, TRAINING_STATE_GROUP
    ('model.safetensors.index.json', 'training_state/objects.json', 'training_state/state')
"""

from __future__ import annotations

import posixpath

__all__ = [
    "MODEL_GROUP",
    "SINGLE_FILE",
    "INDEX_NAME",
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "CONFIG_FILES",
    "TRAINING_STATE_DIR",
    "TRAINING_STATE_GROUP",
    "OBJECTS_FILE",
    "BLOCKS_FILE",
    "SNAPSHOT_KEY",
    "BLOCK_KEY",
    "STAGING_PREFIX",
    "BUILDING_PREFIX",
    "COMMIT_RECORD",
    "LOCK_FILE",
    "DCP_METADATA_FILE",
]

# --- the Hugging Face files -------------------------------------------------------------------

MODEL_GROUP = "model"
"""The stem of the weight files: ``model.safetensors``, ``model-00001-of-00002.safetensors``."""
SINGLE_FILE = f"{MODEL_GROUP}.safetensors"
"""The one weight file of a checkpoint that fits in one shard (and has no index if another tool wrote it)."""
INDEX_NAME = f"{SINGLE_FILE}.index.json"
"""The index: ``weight_map`` (name -> file), ``metadata.total_size``, and our block (:data:`BLOCK_KEY`)."""
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE)
"""The model's configuration files a save writes (and a convert copies) beside the weights."""

# --- what we add: training state, keys in the index and the headers ---------------------------

TRAINING_STATE_DIR = "training_state"
"""The directory of everything that is not a model weight (optimizer state, non-tensor values)."""
TRAINING_STATE_GROUP = posixpath.join(TRAINING_STATE_DIR, "state")
"""The stem of the files holding the tensors kept out of the weight map."""
OBJECTS_FILE = posixpath.join(TRAINING_STATE_DIR, "objects.json")
"""The non-tensor values of a state dict."""
BLOCKS_FILE = "block_checksums.crc32"
"""The CRC-32 of every block of every file a save wrote (:mod:`dcp_safetensors.blocks`): what a
load checks the bytes it reads against. Binary, 8 bytes a block; HF tools ignore it."""
SNAPSHOT_KEY = "dcp_safetensors_snapshot"
"""``__metadata__`` key holding the snapshot id in every file we write."""
BLOCK_KEY = "dcp_safetensors"
"""Our block inside the index's ``metadata``."""

# --- the commit protocol: a save under way ----------------------------------------------------

STAGING_PREFIX = ".dcp_safetensors-staging-"
"""A save's staging directory: this prefix and its snapshot id."""
BUILDING_PREFIX = ".dcp_safetensors-building-"
"""A staging directory while its writer creates and claims it, before it is renamed into place."""
COMMIT_RECORD = "COMMIT.json"
"""In a staging directory: the commit record (the files to publish); once durable, the save is committed."""
LOCK_FILE = "WRITER.lock"
"""In a staging directory: ``flock``ed by the process writing or publishing it; says who that is."""

# --- other formats we recognise -----------------------------------------------------------------

DCP_METADATA_FILE = ".metadata"
"""The metadata file of a torch.distributed.checkpoint (``.distcp``) checkpoint."""
