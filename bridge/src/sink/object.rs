//! Object-storage sink (placeholder, being written).
