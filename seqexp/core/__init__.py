"""Infrastructure every layer may use: errors, atomic files, process liveness, stop signals,
package resources and paths, the checkpoint and ranks file formats. Imports no other layer."""
