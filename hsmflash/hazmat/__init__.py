"""What cannot be undone: irreversible device writes, each behind an explicit `confirm=True`.

Safe recipes (provisioning) compute and check a full plan first, then call in here.
"""
