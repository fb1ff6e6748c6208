"""Run a Discovery inside a namespace for `seconds`; print what it found as JSON."""

import asyncio
import json
import sys

from meshnode.mesh.discovery import Discovery


async def main(ip: str, node_id: str, cluster: str, seconds: float) -> None:
    found: dict[str, dict] = {}
    async with Discovery(node_id=node_id, cluster=cluster, bind_ip=ip, gossip_port=7701,
                         http_port=7700, protocol=1,
                         on_found=lambda f: found.setdefault(f.node_id, {
                             "host": f.host, "cluster": f.cluster})) as d:
        await asyncio.sleep(seconds)
        print(json.dumps({"found": found, "stats": d.stats}), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
