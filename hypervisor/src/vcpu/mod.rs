//! Virtual CPUs: the arch-neutral backend interface and its SVM and VMX implementations.
