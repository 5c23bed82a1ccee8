"""What an upscaled file keeps of its input, shared by the upscale job and the pyfunc (no Ray, no MLflow):

| module     | what                                                                                  |
| ---------- | ------------------------------------------------------------------------------------- |
| `fidelity` | `split` an input into the model's sRGB RGB and what must be carried (alpha, bit depth, profile, EXIF/XMP, mode); `assemble` the output back |
| `codecs`   | image files at full depth with their metadata (16-bit PNG/TIFF read and write)         |
| `colour`   | ICC profiles: to sRGB for the model and back (ImageCms; 16-bit matrix/TRC in float)   |
"""
