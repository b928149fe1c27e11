#!/usr/bin/env python3
"""bench/lagproxy.py LISTEN_PORT TARGET_PORT ONE_WAY_MS: a TCP proxy on loopback that
delays every chunk by ONE_WAY_MS in each direction (a round trip of twice that), as
a server across a network would be; what bench/s3.sh's history part reaches Garage
through."""
import asyncio, sys
LISTEN, TARGET, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
async def pipe(r, w):
    q = asyncio.Queue()
    async def rd():
        while True:
            b = await r.read(1 << 16)
            await q.put((asyncio.get_running_loop().time() + DELAY, b))
            if not b: return
    async def wr():
        while True:
            t, b = await q.get()
            d = t - asyncio.get_running_loop().time()
            if d > 0: await asyncio.sleep(d)
            if not b:
                try: w.write_eof()
                except Exception: pass
                return
            w.write(b); await w.drain()
    await asyncio.gather(rd(), wr(), return_exceptions=True)
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection('127.0.0.1', TARGET)
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw), return_exceptions=True)
    cw.close(); sw.close()
async def main():
    s = await asyncio.start_server(handle, '127.0.0.1', LISTEN)
    async with s: await s.serve_forever()
asyncio.run(main())
