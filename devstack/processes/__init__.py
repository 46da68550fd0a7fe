"""The processes the dev stack starts and stops: SeaweedFS (seaweed), a private Docker Engine (dockerd), the
loader as ``python main.py`` (loader) and the fault proxy put in front of the CDN (faultproxy).
"""
