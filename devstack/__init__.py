"""Local dev stack: a reference Resource API, SeaweedFS as the CDN, seeding and publishing.

Independent of the loader's own modules on purpose, so that it cross-checks them.
"""
