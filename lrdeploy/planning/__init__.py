"""Deciding what to factorize and how: spectra, rank policies, calibration, whitening, costs and the
allocator."""
