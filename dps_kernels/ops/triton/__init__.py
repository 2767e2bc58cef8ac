"""Triton kernels of the DPS backend. Importing this package imports triton: load it lazily.

- ``fused_step``: the DPS + AdamW step of many tensors in one launch per dtype group;
- ``radix_select``: exact (or approximate) k-th largest score, threshold kept on device;
- ``mix``: Mix training-time weight and masked gradient;
- ``keep_mask``: the Stage I column keep-hash shared by the above;
- ``mask_bits``: packs the Stage II subnetwork into bits, and the bit load its consumers use;
- ``library``: ``torch.library`` registration of the functional ops for torch.compile.
"""
