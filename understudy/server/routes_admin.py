"""Admin API (separate key; 404 unless --admin-key is set): drafter versions, the one serving, pin, follow,
rollback, and the speculation controller's state and override. Swap commands run on the hot-swap thread, never the engine's."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from understudy.server.deps import State, require_admin
from understudy.server.errors import APIError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | str = Field(description="version number, 'vN', or an alias name (resolved once)")


class SpeculationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(ge=0, description="draft tokens per step from the next step on (0: speculation off); "
                                            "null: the speculation controller chooses again")


class FollowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")


def _registry(state: Any) -> Any:
    reg = state.hotswap.registry
    if reg is None:
        raise APIError(409, "no drafter registry is configured (start the server with --registry DIR)",
                       code="no_registry")
    return reg


@router.get("/drafters")
async def list_drafters(state: State) -> dict[str, Any]:
    reg = _registry(state)
    versions = await asyncio.to_thread(reg.list_versions)  # a RegistryError carries its 500 registry_error
    aliases = await asyncio.to_thread(reg.aliases)
    fp = state.target.fingerprint
    return {"registry": str(reg.root), "aliases": aliases,
            "versions": [{**v.to_json(), "compatible": v.family_fingerprint == fp} for v in versions]}


@router.get("/drafter")
async def current_drafter(state: State) -> dict[str, Any]:
    return state.hotswap.state()


@router.post("/drafter/pin")
async def pin(body: PinRequest, state: State) -> dict[str, Any]:
    return await asyncio.to_thread(state.hotswap.submit, "pin", body.version)


@router.post("/drafter/follow")
async def follow(body: FollowRequest, state: State) -> dict[str, Any]:
    return await asyncio.to_thread(state.hotswap.submit, "follow", body.alias)


@router.post("/drafter/rollback")
async def rollback(state: State) -> dict[str, Any]:
    return await asyncio.to_thread(state.hotswap.submit, "rollback")


@router.get("/controller")
async def controller(state: State) -> dict[str, Any]:
    return state.controller_state()


@router.post("/controller")
async def pin_speculation(body: SpeculationRequest, state: State) -> dict[str, Any]:
    """Pin K for every step (`{"k": 0}`: speculation off, e.g. to measure its baseline on the same server and
    pair), or hand the choice back to the controller (`{"k": null}`)."""
    return state.pin_speculation(body.k)
