"""Grammar by LanguageTool (the paper's checker): a local install or a running server, never a download."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from .base import GrammarEngine, check_contexts, import_engine, join_context, map_threads, package_version, strip_markup

def _languagetool_dir() -> Path:
    return Path(os.environ.get("LTP_PATH", str(Path.home() / ".cache" / "language_tool_python")))


def _installed_languagetool() -> str | None:
    """Version name of the newest local LanguageTool install, or None (never downloads)."""
    if os.environ.get("LTP_JAR_DIR_PATH"):
        return "jar-dir"
    folder = _languagetool_dir()
    if not folder.is_dir():
        return None
    names = sorted(p.name.removeprefix("LanguageTool-") for p in folder.glob("LanguageTool-*") if p.is_dir())
    return names[-1] if names else None


class LanguageToolGrammar(GrammarEngine):
    """Grammar checking with LanguageTool through language_tool_python, as in the paper.

    Either `server_url` (a running LanguageTool HTTP server: `POST /v2/check` with form fields
    `text` and `language`, JSON `matches` with `offset`/`length`), or a local install found
    under `$LTP_PATH/LanguageTool-<version>/` (Java needed). language_tool_python would
    download LanguageTool on first use; this adapter refuses instead and says how to install it.
    Score = -(matches in the completion) / (completion characters). `ignore_categories`
    (e.g. ["TYPOS"]) drops matches by `rule.category.id`.
    """

    name = "languagetool"

    def __init__(
        self,
        *,
        server_url: str | None = None,
        language: str = "en-US",
        ignore_categories: Sequence[str] = (),
        workers: int | None = None,
        context: bool = True,
    ) -> None:
        language_tool_python = import_engine(
            "language_tool_python", "grammar engine 'languagetool' needs language_tool_python ({exc}); "
                                    "install it with `pip install language_tool_python`")
        self.server_url = server_url
        self.language = language
        self.ignore_categories = tuple(ignore_categories)
        self.use_context = context
        # language_tool_python keeps per-class state while building matches: one thread by default.
        self.workers = workers or 1
        try:
            if server_url:
                self._tool = language_tool_python.LanguageTool(language, remote_server=server_url)
                lt_version = self._server_version(server_url)
            else:
                installed = _installed_languagetool()
                if installed is None:
                    raise EmdpoError(
                        f"grammar engine 'languagetool': no local LanguageTool install under {_languagetool_dir()} "
                        "(set LTP_PATH) and no grammar.server_url; language_tool_python would download it, "
                        "which this builder never does. Unzip LanguageTool-<version>.zip into that folder "
                        "(Java 17+ needed), or run a LanguageTool server and set grammar.server_url, or use "
                        "grammar.engine=harper (offline)"
                    )
                kwargs = {} if installed == "jar-dir" else {"language_tool_download_version": installed}
                self._tool = language_tool_python.LanguageTool(language, **kwargs)
                lt_version = installed
        except EmdpoError:
            raise
        except Exception as exc:  # library raises several types (LanguageToolError, PathError, OSError)
            where = f"server {server_url}" if server_url else "the local install"
            raise EmdpoError(f"grammar engine 'languagetool' cannot start with {where}: {exc}") from None
        self.version = f"LanguageTool {lt_version} (language_tool_python {package_version('language_tool_python')})"

    @staticmethod
    def _server_version(server_url: str) -> str:
        """`software.version` from one documented `/v2/check` call (also proves the server answers)."""
        url = urllib.parse.urljoin(server_url.rstrip("/") + "/", "v2/check")
        data = urllib.parse.urlencode({"text": "Hello.", "language": "en-US"}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        return str((payload.get("software") or {}).get("version", "unknown"))

    def _count_one(self, pair: tuple[str | None, str]) -> int:
        context, text = pair
        full, start = join_context(context if self.use_context else None, text)
        try:
            matches = self._tool.check(strip_markup(full, keep_offsets=True))
        except Exception as exc:
            raise EmdpoError(f"grammar engine 'languagetool': check failed: {exc}") from None
        ignore = set(self.ignore_categories)
        return sum(
            1
            for m in matches
            if m.offset + max(m.error_length, 1) > start and getattr(m, "category", None) not in ignore
        )

    def count_errors(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        pairs = list(zip(check_contexts(texts, contexts), texts))
        return np.array(map_threads(self._count_one, pairs, self.workers), dtype=np.int64)

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.version,
            "server_url": self.server_url,
            "language": self.language,
            "ignore_categories": list(self.ignore_categories),
            "context": self.use_context,
            "score": "-(LanguageTool matches in the completion) / (completion characters)",
        }
