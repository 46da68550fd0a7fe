"""Local dev stack: a reference Resource API, SeaweedFS as the CDN, seeding and publishing.

Independent of the loader's own modules on purpose, so that it cross-checks them.

    stack, run, seed, split, images   the stack (`python -m devstack stack|run`), seeding, publishing
    crypto, signing                   the contract's encryption and signatures, written again from the page
    ports, wait, cache_damage         for tests and benches: free ports, the one polling loop, cache damage
    api/         the reference Resource API: server, admin routes, store, fault middleware, admin client
    processes/   what the stack starts: SeaweedFS, a private dockerd, the loader, the fault proxy
    soak/        the soak engine (docs/soak.md)
"""
