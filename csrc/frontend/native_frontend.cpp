// recserve._frontend: a C++ gRPC data plane whose unary calls are answered in Python.
//
//   fe = NativeFrontend("[::]:0", max_receive_bytes, max_send_bytes)
//   fe.start(); loop.add_reader(fe.fd, ...)     # readable when calls are waiting
//   calls, cancelled = fe.take()
//   for call in calls: ... call.finish(reply_bytes) | call.fail(code, message)
//
// Why: grpc.aio's per-call work (Cython call objects, the poller hand-offs, a coroutine per
// call driven by the event loop) is most of what a Recommend costs the server at 64 in
// flight on a small machine. Here HTTP/2, the call's state machine and the wire bytes stay in
// gRPC C++ (callback API, its own threads); Python sees one queue of calls, with their
// request bytes, read in one go per event-loop wake-up, and answers each with reply bytes.
//
// Served: recserve.v1.RecommendService (METHODS, raw-bytes callback methods of the generated
// service, so it is registered by name and listed by reflection) through that queue;
// grpc.health.v1.Health, gRPC C++'s own service driven by set_serving; server reflection.
// Any other method is answered UNIMPLEMENTED at once (a generic service catches them). A call
// not yet answered when the front end shuts down is answered UNAVAILABLE, so the server's
// shutdown never waits on Python.
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <recserve/v1/recommend.grpc.pb.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace recserve::frontend {
namespace {

class Frontend;

// One unary call, from its arrival until it is answered (by Python or by shutdown). gRPC
// completes a callback unary call only on Finish, so while `answered_` is false its context
// and response buffer are valid. Held by the Python Call and by the front end's open set;
// every caller of answer() holds a reference, so answering (which leaves the open set) never
// frees it mid-call.
class Call;

class PendingCall {
 public:
  PendingCall(Frontend* frontend, grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor,
              grpc::ByteBuffer* response)
      : frontend_(frontend), context_(context), reactor_(reactor), response_(response) {}
  // Answers once; later calls (Python after a shutdown answered it) do nothing and return false.
  bool answer(const grpc::Status& status, grpc::Slice* reply,
              const std::vector<std::pair<std::string, std::string>>& trailing);
  std::vector<std::pair<std::string, std::string>> metadata();
  std::weak_ptr<Call> handle;  // Python's handle, to tell Python of a cancellation (set on arrival)

 private:
  Frontend* frontend_;
  grpc::CallbackServerContext* context_;
  grpc::ServerUnaryReactor* reactor_;
  grpc::ByteBuffer* response_;
  std::mutex mutex_;
  bool answered_ = false;
};

// gRPC's side of one call: lives until OnDone (after Finish). Its only reaction is the
// client's cancellation, passed to Python so that the request is not computed for nobody.
class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryReactor(Frontend* frontend) : frontend_(frontend) {}
  void OnCancel() override;
  void OnDone() override { delete this; }
  std::weak_ptr<PendingCall> pending;

 private:
  Frontend* frontend_;
};

// What Python holds: a handle on a waiting call.
class Call {
 public:
  Call(std::shared_ptr<PendingCall> pending, const std::string& method, std::string request,
       std::optional<double> timeout)
      : pending_(std::move(pending)), method_(method), request_(std::move(request)), timeout_(timeout) {}
  ~Call() {  // dropped unanswered (a bug in the caller): never leave the client hanging
    pending_->answer(grpc::Status(grpc::StatusCode::INTERNAL, "the call was dropped unanswered"), nullptr, {});
  }
  const std::string& method() const { return method_; }
  py::bytes request() const { return py::bytes(request_); }
  std::optional<double> timeout() const { return timeout_; }
  std::vector<std::pair<std::string, std::string>> metadata() { return pending_->metadata(); }
  bool finish(const py::bytes& reply);
  bool fail(int code, const std::string& message, const std::vector<std::pair<std::string, std::string>>& trailing);

 private:
  std::shared_ptr<PendingCall> pending_;
  std::string method_;
  std::string request_;
  std::optional<double> timeout_;  // seconds left when the call arrived; none: no deadline
};

const std::string kRecommend = "/recserve.v1.RecommendService/Recommend";
const std::string kBatchRecommend = "/recserve.v1.RecommendService/BatchRecommend";

class Frontend {
 public:
  Frontend(std::string address, int max_receive_bytes, int max_send_bytes, std::string tls_key,
           std::string tls_cert, std::string tls_client_ca, bool reuse_port)
      : address_(std::move(address)), reuse_port_(reuse_port), max_receive_(max_receive_bytes),
        max_send_(max_send_bytes), tls_key_(std::move(tls_key)), tls_cert_(std::move(tls_cert)),
        tls_ca_(std::move(tls_client_ca)), recommend_(this), unimplemented_() {
    fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("eventfd failed");
  }
  ~Frontend() {
    shutdown(0.0);
    close(fd_);
  }

  int start();
  int fd() const { return fd_; }
  int port() const { return port_; }
  // (calls that arrived, calls their clients cancelled), each oldest first.
  std::pair<std::vector<std::shared_ptr<Call>>, std::vector<std::shared_ptr<Call>>> take();
  // Calls that arrived and are not taken yet.
  size_t waiting() {
    std::lock_guard<std::mutex> lock(mutex_);
    return queue_.size();
  }
  void set_serving(const std::string& service, bool serving) {
    if (server_) server_->GetHealthCheckService()->SetServingStatus(service, serving);
  }
  void shutdown(double grace_s);

  // Called on gRPC's threads.
  // Queues a call on `list` (queue_ or cancelled_; under mutex_), waking Python if both were empty.
  void push(std::vector<std::shared_ptr<Call>>& list, std::shared_ptr<Call> call);
  grpc::ServerUnaryReactor* arrived(const std::string& method, grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request, grpc::ByteBuffer* response);
  void cancelled(const std::shared_ptr<PendingCall>& call);
  void answered(PendingCall* call) {
    std::lock_guard<std::mutex> lock(mutex_);
    open_.erase(call);
  }

 private:
  // RecommendService with both methods as raw-bytes callbacks: registered by name, so the
  // reflection service lists it (grpcurl list), and parsing stays in Python.
  using RecommendBase = recserve::v1::RecommendService::WithRawCallbackMethod_Recommend<
      recserve::v1::RecommendService::WithRawCallbackMethod_BatchRecommend<recserve::v1::RecommendService::Service>>;
  class RecommendService final : public RecommendBase {
   public:
    explicit RecommendService(Frontend* frontend) : frontend_(frontend) {}
    grpc::ServerUnaryReactor* Recommend(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override {
      return frontend_->arrived(kRecommend, context, request, response);
    }
    grpc::ServerUnaryReactor* BatchRecommend(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response) override {
      return frontend_->arrived(kBatchRecommend, context, request, response);
    }

   private:
    Frontend* frontend_;
  };

  // Every other method (the admin, feature and KServe services live on the main port).
  class UnimplementedReactor final : public grpc::ServerGenericBidiReactor {
   public:
    explicit UnimplementedReactor(const std::string& method) {
      Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                          "method " + method + " is not served on the native port; use the server's main port"));
    }
    void OnDone() override { delete this; }
  };
  class UnimplementedService final : public grpc::CallbackGenericService {
   public:
    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
      return new UnimplementedReactor(context->method());
    }
  };

  std::string address_;
  bool reuse_port_;
  int max_receive_, max_send_;
  std::string tls_key_, tls_cert_, tls_ca_;
  RecommendService recommend_;
  UnimplementedService unimplemented_;
  int fd_ = -1;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::mutex mutex_;
  std::vector<std::shared_ptr<Call>> queue_;                               // arrived, not yet taken by Python
  std::vector<std::shared_ptr<Call>> cancelled_;                           // cancelled by the client, not yet taken
  std::unordered_map<PendingCall*, std::shared_ptr<PendingCall>> open_;  // arrived, not yet answered
  bool closing_ = false;
  bool stopped_ = false;
};

std::string bytes_of(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  size_t size = 0;
  for (const auto& s : slices) size += s.size();
  out.reserve(size);
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

bool PendingCall::answer(const grpc::Status& status, grpc::Slice* reply,
                         const std::vector<std::pair<std::string, std::string>>& trailing) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (answered_) return false;
    answered_ = true;
  }
  frontend_->answered(this);
  for (const auto& [key, value] : trailing) context_->AddTrailingMetadata(key, value);
  if (reply != nullptr && status.ok()) {
    *response_ = grpc::ByteBuffer(reply, 1);
  }
  reactor_->Finish(status);
  return true;
}

std::vector<std::pair<std::string, std::string>> PendingCall::metadata() {
  std::vector<std::pair<std::string, std::string>> out;
  std::lock_guard<std::mutex> lock(mutex_);
  if (answered_) return out;  // the context may be gone
  for (const auto& [key, value] : context_->client_metadata()) {
    out.emplace_back(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
  }
  return out;
}

bool Call::finish(const py::bytes& reply) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(reply.ptr(), &data, &size) != 0) throw py::error_already_set();
  grpc::Slice bytes(data, static_cast<size_t>(size));  // the one copy of the reply
  // Finish writes the reply on this thread when the transport is idle (HTTP/2 framing,
  // sendmsg, on loopback even the receiver's TCP processing): 150-300 us here, which must
  // not hold the GIL the event loop and the batch workers need.
  py::gil_scoped_release nogil;
  return pending_->answer(grpc::Status::OK, &bytes, {});
}

bool Call::fail(int code, const std::string& message,
                const std::vector<std::pair<std::string, std::string>>& trailing) {
  if (code <= 0 || code > 16) throw std::invalid_argument("fail: code must be a non-OK gRPC status code (1..16)");
  py::gil_scoped_release nogil;  // as in finish
  return pending_->answer(grpc::Status(static_cast<grpc::StatusCode>(code), message), nullptr, trailing);
}

int Frontend::start() {
  if (server_) throw std::runtime_error("the native front end is already started");
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (tls_cert_.empty()) {
    credentials = grpc::InsecureServerCredentials();
  } else {
    grpc::SslServerCredentialsOptions options(
        tls_ca_.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                        : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    options.pem_root_certs = tls_ca_;
    options.pem_key_cert_pairs.push_back({tls_key_, tls_cert_});
    credentials = grpc::SslServerCredentials(options);
  }
  builder.AddListeningPort(address_, credentials, &port_);
  // gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and
  // silently take half the connections. Only worker processes share a port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port_ ? 1 : 0);
  builder.SetMaxReceiveMessageSize(max_receive_);
  builder.SetMaxSendMessageSize(max_send_);
  builder.RegisterService(&recommend_);
  builder.RegisterCallbackGenericService(&unimplemented_);
  {
    py::gil_scoped_release release;
    server_ = builder.BuildAndStart();
  }
  if (!server_ || port_ == 0) {
    server_.reset();
    throw std::runtime_error("could not listen on " + address_ + " (address in use or invalid)");
  }
  server_->GetHealthCheckService()->SetServingStatus(false);
  return port_;
}

grpc::ServerUnaryReactor* Frontend::arrived(const std::string& method, grpc::CallbackServerContext* context,
                                            const grpc::ByteBuffer* request, grpc::ByteBuffer* response) {
  auto* reactor = new UnaryReactor(this);
  std::optional<double> timeout;
  auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    timeout = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
  }
  auto bytes = bytes_of(*request);
  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_) {
    lock.unlock();
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is draining; retry on another replica"));
    return reactor;
  }
  auto pending = std::make_shared<PendingCall>(this, context, reactor, response);
  reactor->pending = pending;
  open_.emplace(pending.get(), pending);
  auto call = std::make_shared<Call>(pending, method, std::move(bytes), timeout);
  pending->handle = call;
  push(queue_, std::move(call));
  return reactor;
}

void Frontend::push(std::vector<std::shared_ptr<Call>>& list, std::shared_ptr<Call> call) {
  bool was_empty = queue_.empty() && cancelled_.empty();
  list.push_back(std::move(call));
  if (was_empty) {
    uint64_t one = 1;
    (void)!write(fd_, &one, sizeof one);  // wakes the event loop's reader
  }
}

void UnaryReactor::OnCancel() {
  if (auto call = pending.lock()) frontend_->cancelled(call);
}

void Frontend::cancelled(const std::shared_ptr<PendingCall>& pending) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto call = pending->handle.lock();
  if (closing_ || !call || open_.count(pending.get()) == 0) return;  // answered already: nothing to stop
  push(cancelled_, std::move(call));
}

std::pair<std::vector<std::shared_ptr<Call>>, std::vector<std::shared_ptr<Call>>> Frontend::take() {
  std::pair<std::vector<std::shared_ptr<Call>>, std::vector<std::shared_ptr<Call>>> out;
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t count;
  (void)!read(fd_, &count, sizeof count);  // reset under the lock: the next arrival writes again
  out.first.swap(queue_);
  out.second.swap(cancelled_);
  return out;
}

void Frontend::shutdown(double grace_s) {
  std::vector<std::shared_ptr<PendingCall>> open;
  std::vector<std::shared_ptr<Call>> queued, cancelled;  // released after they are answered below
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_ || !server_) return;
    closing_ = true;
    queued.swap(queue_);
    cancelled.swap(cancelled_);
  }
  server_->GetHealthCheckService()->Shutdown();  // NOT_SERVING from now on
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : open_) open.push_back(entry.second);
  }
  for (auto& call : open) {
    call->answer(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server stopped before this request ran; retry"),
                    nullptr, {});
  }
  py::gil_scoped_release release;
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6)));
  server_->Wait();
  stopped_ = true;
}

}  // namespace

PYBIND11_MODULE(_frontend, m) {
  m.doc() = "recserve's C++ gRPC data plane (use it through recserve.server.native)";
  m.attr("METHODS") = std::vector<std::string>{kRecommend, kBatchRecommend};
  py::class_<Call, std::shared_ptr<Call>>(m, "Call")
      .def_property_readonly("method", &Call::method)
      .def_property_readonly("request", &Call::request)
      .def_property_readonly("timeout", &Call::timeout,
                             "seconds the caller's deadline had left when the call arrived (None: no deadline)")
      .def("metadata", &Call::metadata, "the caller's metadata as (key, value) pairs (before answering only)")
      .def("finish", &Call::finish, py::arg("reply"), "answer OK with the serialized reply; False if already answered")
      .def("fail", &Call::fail, py::arg("code"), py::arg("message"), py::arg("trailing") = std::vector<std::pair<std::string, std::string>>{},
           "answer with a non-OK status code and message; False if already answered");
  py::class_<Frontend>(m, "NativeFrontend")
      .def(py::init<std::string, int, int, std::string, std::string, std::string, bool>(),
           py::arg("address"), py::arg("max_receive_bytes") = 4 << 20,
           py::arg("max_send_bytes") = 16 << 20, py::arg("tls_key") = "", py::arg("tls_cert") = "",
           py::arg("tls_client_ca") = "", py::arg("reuse_port") = false)
      .def("start", &Frontend::start, "listen; returns the bound port (health NOT_SERVING until set_serving)")
      .def_property_readonly("fd", &Frontend::fd, "an eventfd, readable when calls wait to be taken")
      .def_property_readonly("port", &Frontend::port)
      .def_property_readonly("waiting", &Frontend::waiting, "calls that arrived and are not taken yet")
      .def("take", &Frontend::take,
           "(calls waiting, calls their clients cancelled since): each list oldest first")
      .def("set_serving", &Frontend::set_serving, py::arg("service"), py::arg("serving"))
      .def("shutdown", &Frontend::shutdown, py::arg("grace_s") = 0.0,
           "refuse new calls, answer unanswered ones UNAVAILABLE, stop listening");
}

}  // namespace recserve::frontend
