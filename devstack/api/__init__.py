"""The reference Resource API, run as ``python -m devstack.api.server``.

server (the app, its public routes and the command line), admin_routes (the ``/_devstack/`` endpoints),
store (its users, settings and resources on disk), faults (the middleware that misbehaves on request),
admin_client (the client for ``/_devstack/`` the stack, the seed step and tests use).
"""
