//! Intel VT-d remapping hardware driver.
