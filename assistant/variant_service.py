"""The prompt variants in force, how the users' votes rate them, and the admin's edits.

The page and the API both come here; the chat service reads `variants` on every turn. Edits are
saved in DuckDB (every version kept, like the constitution), so they outlive a restart.
"""

from __future__ import annotations

import asyncio

from assistant.chat_service import ChatService
from assistant.prompt_variants import (
    PromptVariants,
    VariantError,
    parse_variants,
    variant_results,
)
from storage import Store


class VariantService:
    def __init__(self, store: Store, chat: ChatService) -> None:
        self.store = store
        self.chat = chat

    async def load(self) -> None:
        """The admin's last saved variants, if any (else the shipped file stays)."""
        saved = await asyncio.to_thread(self.store.latest_prompt_variants)
        if saved is not None:
            self.chat.variants = parse_variants(saved, "saved prompt variants")

    async def status(self) -> dict:
        results = variant_results(await asyncio.to_thread(self.store.variant_votes))
        variants = self.chat.variants
        return {
            "default": variants.default,
            "share": self.chat.serve.variant_share,
            "variants": [
                {**v.as_json(), "results": results.get(v.name)} for v in variants.variants
            ],
        }

    async def replace(self, body: object) -> dict:
        """An admin replaces the whole file; refused (422, naming the entry) if malformed."""
        await self._save(parse_variants(body, "prompt variants"))
        return await self.status()

    async def make_default(self, name: object) -> dict:
        """An admin makes a variant (the winner, say) the one every ordinary turn uses."""
        if not isinstance(name, str):
            raise VariantError("'name' must be a variant's name")
        await self._save(self.chat.variants.with_default(name))
        return await self.status()

    async def _save(self, variants: PromptVariants) -> None:
        await asyncio.to_thread(self.store.save_prompt_variants, variants.as_json())
        self.chat.variants = variants
